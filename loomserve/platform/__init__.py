"""The shared engine: from token ids to sampled tokens."""

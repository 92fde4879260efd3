"""Per-model processors: raw media + a prompt with placeholders -> expanded token ids and items."""

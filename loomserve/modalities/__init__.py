"""Media in, placeholder tokens out: loading, preprocessing, per-model processors and the encoder cache."""

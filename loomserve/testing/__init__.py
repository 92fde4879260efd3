"""Test and benchmark support shipped with the package: seeded tiny checkpoints in real Hugging Face format (text,
multimodal, pooling), built once into a local cache, and a live `loomserve serve` launcher."""

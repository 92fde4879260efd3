"""The embedded default `loomserve serve` runs without a MODEL: a random qwen2-family checkpoint, built once into
the local cache, named DEMO_NAME, served beside the real all-MiniLM-L6-v2 as DEMO_EMBEDDING_NAME."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loomserve.testing.checkpoints import cached_tiny_checkpoint

DEMO_NAME = "loomserve-demo"
DEMO_EMBEDDING_NAME = "all-MiniLM-L6-v2"
# 2 KiB of KV per token (4 layers x 2 KV heads x 32 dims x K and V, fp32): 8,192 tokens, two full contexts.
DEMO_KV_CACHE_MEMORY = "16MiB"

DEMO_KWARGS: dict[str, Any] = {
    "seed": 0,
    "hidden_size": 256,
    "num_layers": 4,
    "num_heads": 8,
    "num_kv_heads": 2,
    "intermediate_size": 512,
    "max_position_embeddings": 4096,
}


def demo_checkpoint() -> Path:
    """A qwen2-family checkpoint a bit bigger than the test ones (hidden 256, 4 layers, 8 heads, 2 kv heads,
    intermediate 512, 4096 positions), cached like `tiny_checkpoint`."""
    return cached_tiny_checkpoint("qwen2", DEMO_KWARGS, "demo-qwen2")

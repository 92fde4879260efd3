"""Seeded random weights for the tiny checkpoints, independent of transformers' own initialisation."""

from __future__ import annotations

from typing import Any

NORM_JITTER = 0.1  # norm gains are 1 + N(0, NORM_JITTER)


def init_weights(model: Any, seed: int, std: float) -> None:
    """Overwrites every parameter from a generator seeded with `seed`, in sorted-name order.

    Independent of transformers' own `_init_weights`, so the same seed gives the same tensors across transformers
    versions. Matrices, embeddings and biases ~ N(0, std), with a large `std` so greedy decoding has well separated
    top-1/top-2 logits; 1-D norm gains ~ 1 + N(0, NORM_JITTER), random so a forward that ignores a norm's weight
    is caught.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            values = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            is_gain = name.endswith("weight") and param.ndim == 1 and "norm" in name.lower()
            param.copy_(1.0 + NORM_JITTER * values if is_gain else std * values)

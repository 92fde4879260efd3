"""Pooled tensors on the engine's msgpack wire: `[shape, float32 little-endian bytes]`."""

from __future__ import annotations

import numpy as np
import torch

PooledWire = list  # [shape: list[int], data: bytes]


def tensor_to_wire(x: torch.Tensor) -> PooledWire:
    return [list(x.shape), x.detach().float().cpu().numpy().astype("<f4").tobytes()]


def tensor_from_wire(wire: PooledWire) -> torch.Tensor:
    shape, data = wire
    return torch.from_numpy(np.frombuffer(data, dtype="<f4").copy()).reshape(shape)

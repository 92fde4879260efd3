"""What flows from the front end to the engine for each media item, and its compact wire form.

A `MultiModalItem` is one image, video or audio clip after preprocessing: its modality, the SHA-256 of
its content (the encoder-cache and prefix-cache key), where its placeholder tokens sit in the prompt,
and the tensors its encoder consumes. Tensors travel as raw bytes plus dtype and shape inside the
msgpack message (no pickling).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
           "int32": torch.int32, "uint8": torch.uint8}


@dataclass(frozen=True)
class PlaceholderRange:
    """The item's embeddings replace prompt tokens [offset, offset + length)."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass
class MultiModalItem:
    modality: str  # "image" | "video" | "audio"
    content_hash: str  # hex SHA-256 over the modality, processing settings and content
    placeholder: PlaceholderRange
    data: dict[str, torch.Tensor] = field(default_factory=dict)  # what the encoder consumes (see each processor)
    meta: dict[str, float] = field(default_factory=dict)  # scalars the model needs besides tensors (e.g. video fps)

    def to_wire(self) -> list:
        tensors = {name: tensor_to_wire(t) for name, t in self.data.items()}
        return [self.modality, self.content_hash, self.placeholder.offset, self.placeholder.length, tensors, self.meta]

    @classmethod
    def from_wire(cls, w: list) -> MultiModalItem:
        data = {name: tensor_from_wire(t) for name, t in w[4].items()}
        return cls(w[0], w[1], PlaceholderRange(w[2], w[3]), data, dict(w[5]))


def tensor_to_wire(t: torch.Tensor) -> list[Any]:
    t = t.detach().cpu().contiguous()
    raw = t.view(torch.int16).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
    return [str(t.dtype).removeprefix("torch."), list(t.shape), raw]


def tensor_from_wire(w: list[Any]) -> torch.Tensor:
    dtype_name, shape, raw = w
    dtype = _DTYPES[dtype_name]
    if dtype == torch.bfloat16:
        return torch.from_numpy(np.frombuffer(raw, dtype=np.int16).copy()).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(np.frombuffer(raw, dtype=str(dtype).removeprefix("torch.")).copy()).reshape(shape)

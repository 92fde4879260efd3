"""The one wire form of every process boundary: msgspec over msgpack, decoded by type.

Front end <-> EngineCore messages (`messages.py`) and EngineCore <-> runner steps (`step.py`) are dataclasses that
msgspec encodes as they are; tensors travel as [dtype, shape, raw bytes] (no pickling). msgspec is imported only
here, and this module only where a boundary is crossed, so an in-process engine runs without it.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec
import numpy as np
import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
           "int32": torch.int32, "int16": torch.int16, "uint8": torch.uint8, "float8_e4m3fn": torch.float8_e4m3fn,
           "float8_e5m2": torch.float8_e5m2}
# dtypes numpy lacks travel as the bits of an integer type of their size (an fp8 KV cache's blocks, P/D)
_AS_BITS = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8, torch.float8_e5m2: torch.uint8}


def tensor_to_wire(t: torch.Tensor) -> list[Any]:
    t = t.detach().cpu().contiguous()
    raw = t.view(_AS_BITS.get(t.dtype, t.dtype)).numpy().tobytes()
    return [str(t.dtype).removeprefix("torch."), list(t.shape), raw]


def tensor_from_wire(w: list[Any]) -> torch.Tensor:
    dtype_name, shape, raw = w
    dtype = _DTYPES[dtype_name]
    bits = str(_AS_BITS.get(dtype, dtype)).removeprefix("torch.")
    return torch.from_numpy(np.frombuffer(raw, dtype=bits).copy()).view(dtype).reshape(shape)


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return tensor_to_wire(obj)
    raise NotImplementedError(f"cannot send a {type(obj).__name__} across processes")


def _dec_hook(kind: type, obj: Any) -> Any:
    if kind is torch.Tensor:
        return tensor_from_wire(obj)
    raise NotImplementedError(f"cannot read a {kind.__name__} from a message")


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)


@functools.cache
def _decoder(kind: Any) -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(kind, dec_hook=_dec_hook)


def encode(value: Any) -> bytes:
    return _encoder.encode(value)


def decode(data: bytes | msgspec.Raw, kind: Any = Any) -> Any:
    """`data` as a `kind` (a dataclass, a container of them, or plain values by default)."""
    return _decoder(kind).decode(data)


def encode_tagged(value: Any) -> bytes:
    """A value whose type the reader learns from the message: [type name, value]."""
    return _encoder.encode([type(value).__name__, value])


def decode_tagged(data: bytes, types: dict[str, type]) -> Any:
    name, raw = decode(data, tuple[str, msgspec.Raw])
    return decode(raw, types[name])

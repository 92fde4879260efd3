"""Pooled tensors -> what a response carries: JSON floats; base64 of float32 / float16 / bfloat16 values in native,
big or little byte order (`embed_dtype`, `endianness`); vLLM's binary body (`encoding_format: "bytes"`: the raw
tensors one after another, a `metadata` header saying where each lies; "bytes_only": no header); and Cohere's typed
embeddings (float, int8, uint8, binary, ubinary, base64)."""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from fastapi.responses import Response

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_BYTE_ORDER = {"little": "<", "big": ">", "native": "<" if sys.byteorder == "little" else ">"}


def tensor_bytes(tensor: torch.Tensor, embed_dtype: str = "float32", endianness: str = "native") -> bytes:
    """The tensor's values as `embed_dtype` in `endianness` byte order, row-major."""
    values = tensor.detach().to("cpu", _DTYPES[embed_dtype]).contiguous()
    if embed_dtype == "bfloat16":  # numpy has no bfloat16: its bit patterns, as 16-bit integers
        array = values.view(torch.int16).numpy().astype(f"{_BYTE_ORDER[endianness]}i2")
    else:
        array = values.numpy()
        array = array.astype(array.dtype.newbyteorder(_BYTE_ORDER[endianness]))
    return array.tobytes()


def encode_json(tensor: torch.Tensor, encoding_format: str, embed_dtype: str = "float32",
                endianness: str = "native") -> list[float] | list[list[float]] | str:
    """float: a JSON list (nested for per-token outputs); base64: the `tensor_bytes`, base64-encoded."""
    if encoding_format == "base64":
        return base64.b64encode(tensor_bytes(tensor, embed_dtype, endianness)).decode("ascii")
    return tensor.tolist()


def bytes_response(tensors: Sequence[torch.Tensor], encoding_format: str, embed_dtype: str, endianness: str,
                   envelope: dict[str, Any]) -> Response:
    """vLLM's binary answer: an application/octet-stream body of every tensor's bytes; with "bytes" a `metadata`
    header holds `envelope` (id, created, model, usage) and, per tensor, where its bytes start and end and its
    shape."""
    body, items, offset = [], [], 0
    for index, tensor in enumerate(tensors):
        raw = tensor_bytes(tensor, embed_dtype, endianness)
        items.append({"index": index, "embed_dtype": embed_dtype, "endianness": endianness, "start": offset,
                      "end": offset + len(raw), "shape": list(tensor.shape)})
        body.append(raw)
        offset += len(raw)
    headers = None if encoding_format == "bytes_only" else {"metadata": json.dumps({**envelope, "data": items})}
    return Response(b"".join(body), media_type="application/octet-stream", headers=headers)


def typed_embeddings(vectors: torch.Tensor, embedding_types: Sequence[str]) -> dict[str, list]:
    """Cohere's `embeddings` object for [B, D] vectors: per requested type, one entry per vector. int8 / uint8
    scale the [-1, 1] range (where normalized vectors lie) onto the integers; binary / ubinary pack the signs, 8 dims
    per byte, most significant bit first (binary as signed bytes). ValueError when D is no multiple of 8 for these."""
    x = vectors.detach().float().cpu()
    out: dict[str, list] = {}
    for kind in embedding_types:
        if kind == "float":
            out[kind] = x.tolist()
        elif kind == "base64":
            out[kind] = [encode_json(row, "base64", "float32", "little") for row in x]
        elif kind == "int8":
            out[kind] = (x.clamp(-1, 1) * 127).round().to(torch.int8).tolist()
        elif kind == "uint8":
            out[kind] = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).tolist()
        else:
            out[kind] = _packed_signs(x, signed=kind == "binary")
    return out


def _packed_signs(x: torch.Tensor, signed: bool) -> list[list[int]]:
    if x.shape[-1] % 8:
        raise ValueError(f"binary embedding types need a dimension divisible by 8, got {x.shape[-1]}")
    packed = np.packbits(x.numpy() >= 0, axis=-1).astype(np.int16)  # [B, D / 8]
    return (packed - 128 if signed else packed).tolist()

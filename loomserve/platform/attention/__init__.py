"""Paged attention backends behind one interface: `torch` (the reference, CPU and CUDA) and `triton` (CUDA)."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from loomserve.platform.attention.metadata import AttentionMetadata
from loomserve.platform.attention.torch_backend import TorchAttentionBackend

BACKENDS = ("torch", "triton")


def resolve_attention_backend(name: str, device: torch.device) -> str:
    """`auto` is Triton on CUDA (when triton is installed) and the torch reference elsewhere."""
    if name == "auto":
        return "triton" if device.type == "cuda" and importlib.util.find_spec("triton") else "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}")
    if name == "triton" and device.type != "cuda" and not _triton_interpreted():
        raise ValueError("the triton attention backend needs a CUDA device")
    return name


def get_attention_backend(name: str) -> Any:
    if name in ("auto", "torch"):
        return TorchAttentionBackend
    if name == "triton":
        # triton is imported only when asked for: the CPU install does not need it.
        from loomserve.platform.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend
    raise ValueError(f"unknown attention backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}")


def _triton_interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


__all__ = ["AttentionMetadata", "TorchAttentionBackend", "get_attention_backend", "resolve_attention_backend"]

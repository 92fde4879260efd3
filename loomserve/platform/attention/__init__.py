"""Paged attention backends behind one interface: `torch` (reference, CPU and CUDA), more to come."""

from loomserve.platform.attention.metadata import AttentionMetadata
from loomserve.platform.attention.torch_backend import TorchAttentionBackend

_BACKENDS = {"torch": TorchAttentionBackend}


def get_attention_backend(name: str) -> type[TorchAttentionBackend]:
    """`auto` picks the best backend for the device; only the torch reference exists so far."""
    if name == "auto":
        name = "torch"
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of: auto, {', '.join(_BACKENDS)}")
    return _BACKENDS[name]


__all__ = ["AttentionMetadata", "TorchAttentionBackend", "get_attention_backend"]

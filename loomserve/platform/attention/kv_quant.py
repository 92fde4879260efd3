"""The FP8 KV cache (`--kv-cache-dtype fp8`): which float8 format a cache name means, each layer's key and value
scales, and the scaled conversions of the write and read paths of the torch backend (the Triton kernels do the same
arithmetic in-kernel).

As in vLLM, a key is stored as `k / k_scale` saturated to the format's finite range and read back as
`stored * k_scale`; values likewise with `v_scale`. Scales come from the checkpoint (`quantization/kv_scales.py`),
from the first batch's absolute maxima (`--calculate-kv-scales`), or are 1.0.
"""

from __future__ import annotations

import torch
from torch import nn

FP8_KV_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# vLLM's --calculate-kv-scales divisors (K_SCALE_CONSTANT, V_SCALE_CONSTANT): the first batch's absolute maximum
# lands well inside the range, leaving room for later, larger keys and values.
_K_RANGE = 200.0
_V_RANGE = 100.0


def kv_cache_dtype(cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of the cache that `--kv-cache-dtype` names: auto is the model's."""
    return model_dtype if cache_dtype == "auto" else FP8_KV_DTYPES[cache_dtype]


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def all_scales_one(model: nn.Module) -> bool:
    """Whether no layer of `model` got KV scales (from its checkpoint): vLLM warns of those fp8 caches."""
    return all(m.k_scale.item() == 1.0 and m.v_scale.item() == 1.0 for m in model.modules() if isinstance(m, KVScales))


def byte_view(cache: torch.Tensor) -> torch.Tensor:
    """The same memory as bytes where the cache is fp8: torch implements no index_copy_ for float8 (on CPU), and
    copying blocks needs none of their meaning."""
    return cache.view(torch.uint8) if is_fp8(cache.dtype) else cache


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x / scale, saturated to the finite range of the float8 `dtype` (out-of-range values would become NaN/inf)."""
    limit = torch.finfo(dtype).max
    return (x.float() / scale).clamp_(-limit, limit).to(dtype)


def dequantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (x.float() * scale).to(dtype)


class KVScales(nn.Module):
    """One attention layer's key and value scales, float32 scalars on the layer's device (tensors, not numbers, so a
    CUDA graph captured before they change reads the new values)."""

    def __init__(self) -> None:
        super().__init__()
        # Not persistent: they are no weights of the model's state dict, the loader sets them from the checkpoint.
        self.register_buffer("k_scale", torch.ones((), dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones((), dtype=torch.float32), persistent=False)

    def set(self, k_scale: float, v_scale: float) -> None:
        if not (k_scale > 0 and v_scale > 0):
            raise ValueError(f"KV cache scales must be positive, got k_scale {k_scale}, v_scale {v_scale}")
        self.k_scale.fill_(k_scale)
        self.v_scale.fill_(v_scale)

    def calculate(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Scales from this batch's keys and values ([T, Hkv, D]), as vLLM's --calculate-kv-scales takes them; on
        the device, without a sync (an all-zero batch keeps scale 1)."""
        for scale, x, scale_range in ((self.k_scale, k, _K_RANGE), (self.v_scale, v, _V_RANGE)):
            amax = x.detach().abs().amax().float() if x.numel() else scale.new_zeros(())
            scale.copy_(torch.where(amax > 0, amax / scale_range, 1.0))

"""The reference of the FP8 KV cache: a transformers attention function that rounds keys and values through float8
before sdpa, as the engine stores them (divided by the layer's scale, saturated, multiplied back on read)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def fake_quantized_attention(dtype: torch.dtype, scales: Callable[[int], tuple[float, float]]) -> str:
    """Register, under a name of its own (returned, for `attn_implementation=`), sdpa over keys and values rounded
    through float8 `dtype` with `scales(layer index)` = (k_scale, v_scale)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    limit = torch.finfo(dtype).max

    def through_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
        return ((x / scale).clamp(-limit, limit).to(dtype).float() * scale).to(x.dtype)

    def attention(module, query, key, value, attention_mask, **kwargs):
        k_scale, v_scale = scales(module.layer_idx)
        return sdpa_attention_forward(module, query, through_fp8(key, k_scale), through_fp8(value, v_scale),
                                      attention_mask, **kwargs)

    name = f"fp8_kv_{id(attention)}"
    AttentionInterface.register(name, attention)
    return name

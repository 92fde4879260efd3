"""Rotary position embeddings: a cos/sin table precomputed once, gathered at each token's position.

Frequencies come from transformers' own RoPE functions (`ROPE_INIT_FUNCTIONS`) for every scaled type, so the
table equals what the checkpoint's reference implementation computes. The rotation is the NeoX / HF
`rotate_half` one, applied to the first `rotary_dim` dims of each head.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loomserve.platform.models.layers import use_fused_kernels

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def rope_parameters(config: Any) -> dict[str, Any]:
    """RoPE settings: transformers 5 `rope_parameters`, or older top-level rope_theta / rope_scaling."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def compute_inv_freq(config: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim // 2] float32, attention_scaling) for the config's rope type.

    `dynamic` NTK is evaluated at seq_len = max_position_embeddings, the longest context served, where it
    equals `default`, as transformers computes for any sequence within the original context.
    """
    params = rope_parameters(config)
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        supported = ", ".join(SUPPORTED_ROPE_TYPES)
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {supported}")
    if rope_type == "default":
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        return 1.0 / (params["rope_theta"] ** exponents), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    return inv_freq.float(), float(attention_scaling)


class RotaryEmbedding(nn.Module):
    """cos/sin of every position up to `max_positions`, times the rope type's attention scaling."""

    def __init__(self, config: Any, head_dim: int, max_positions: int) -> None:
        super().__init__()
        inv_freq, attention_scaling = compute_inv_freq(config, head_dim)
        self.rotary_dim = 2 * inv_freq.numel()
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # [P, rotary_dim / 2]
        # [P, rotary_dim]: cos in the first half, sin in the second; float32 whatever the model dtype.
        cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1) * attention_scaling
        self.cos_sin_cache = nn.Buffer(cos_sin, persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """[T] positions -> [T, rotary_dim] cos|sin rows, to pass to `apply_rotary` in every layer."""
        return self.cos_sin_cache.index_select(0, positions)


def apply_rotary(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] by cos_sin [T, rotary_dim] in x's dtype; dims past rotary_dim pass through."""
    half = cos_sin.shape[-1] // 2
    cos, sin = cos_sin.to(x.dtype)[:, None].chunk(2, dim=-1)  # [T, 1, half] each
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def rotate_qk(q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, H, D] and k [T, Hkv, D]; on CUDA in place with one fused kernel."""
    if use_fused_kernels(q):
        from loomserve.platform.models.triton_ops import rotary_qk_

        rotary_qk_(q, k, cos_sin)
        return q, k
    return apply_rotary(q, cos_sin), apply_rotary(k, cos_sin)

"""Fused Triton kernels for the decoder's small elementwise steps on CUDA: residual add + RMSNorm,
rotary embedding of q and k in place, and SiLU-and-mul. Each replaces several torch kernels with one,
computing in float32 and rounding where transformers rounds, so the numbers stay those of the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_r, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # the sum, rounded to the model dtype
        tl.store(res_out_ptr + row * n_cols + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    h = (xf * tl.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * n_cols + cols, (w.to(tl.float32) * h.to(tl.float32)).to(x.dtype), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [T, N] (rows contiguous) -> RMSNorm(x + residual); with a residual also returns the sum."""
    num_rows, n = x.shape
    out = torch.empty((num_rows, n), dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else out
    if num_rows:
        _rms_norm_kernel[(num_rows,)](
            x, residual if residual is not None else x, weight, out, res_out,
            x.stride(0), residual.stride(0) if residual is not None else 0, n, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n),
        )
    return out if residual is None else (out, res_out)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, cos_sin_ptr,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_cs,
    num_q_heads, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    if h < num_q_heads:
        base = q_ptr + t * stride_q_t + h * stride_q_h
    else:
        base = k_ptr + t * stride_k_t + (h - num_q_heads) * stride_k_h
    i = tl.arange(0, HALF_PAD)
    mask = i < HALF
    x1 = tl.load(base + i, mask=mask, other=0.0)
    x2 = tl.load(base + HALF + i, mask=mask, other=0.0)
    # cos/sin are rounded to the model dtype first, as transformers does.
    cos = tl.load(cos_sin_ptr + t * stride_cs + i, mask=mask, other=0.0).to(x1.dtype).to(tl.float32)
    sin = tl.load(cos_sin_ptr + t * stride_cs + HALF + i, mask=mask, other=0.0).to(x1.dtype).to(tl.float32)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(base + i, (a * cos - b * sin).to(x1.dtype), mask=mask)
    tl.store(base + HALF + i, (b * cos + a * sin).to(x1.dtype), mask=mask)


def rotary_qk_(q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """Rotate q [T, H, D] and k [T, Hkv, D] in place by cos_sin [T, rotary_dim] (first rotary_dim dims)."""
    num_tokens, num_heads, _ = q.shape
    if num_tokens == 0:
        return
    half = cos_sin.shape[-1] // 2
    _rotary_kernel[(num_tokens, num_heads + k.shape[1])](
        q, k, cos_sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin.stride(0),
        num_heads, HALF=half, HALF_PAD=triton.next_power_of_2(half),
    )


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(out_ptr + row * n_cols + cols, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, 2I] -> [T, I]: silu(gate) * up."""
    num_rows, width = x.shape
    n = width // 2
    out = torch.empty((num_rows, n), dtype=x.dtype, device=x.device)
    if num_rows:
        block = 1024
        _silu_and_mul_kernel[(num_rows, triton.cdiv(n, block))](x, out, x.stride(0), n, BLOCK=block)
    return out

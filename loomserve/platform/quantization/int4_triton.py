"""A Triton dequantize-in-the-GEMM kernel for INT4 weights at small batches (decode), where a GEMM reads its weights
once: each tile of 4-bit values is unpacked, scaled in registers and multiplied, so the weights cross memory as
4-bit, not as a dequantized copy. Layout (GPTQ's, which AWQ converts to at load): `qweight` int32 [in / 8, out],
8 input rows per int32, lowest nibble first; `scales` and `scaled_zeros` (zero point * scale) [groups, out]; `g_idx`
[in] each input row's group. w = value * scale - scaled_zero.

Runs on CUDA, and on CPU under TRITON_INTERPRET=1 (tests)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _int4_matmul_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, out_ptr,
    M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        packed = tl.load(qweight_ptr + (offs_k // 8)[:, None] * N + offs_n[None, :],
                         mask=mask_k[:, None] & mask_n[None, :], other=0)  # [BLOCK_K, BLOCK_N] int32
        values = ((packed >> ((offs_k % 8) * 4)[:, None]) & 0xF).to(tl.float32)
        group = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0)
        where = group[:, None] * N + offs_n[None, :]
        scale = tl.load(scales_ptr + where, mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + where, mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        w = values * scale - zero  # [BLOCK_K, BLOCK_N]
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_K]
        acc += tl.dot(x, w)
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, scaled_zeros: torch.Tensor,
                g_idx: torch.Tensor) -> torch.Tensor:
    """x [M, K] (rows contiguous) times the INT4 weights -> [M, N] in x's dtype."""
    x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[1]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_n = 64
    grid = (triton.cdiv(m, 16), triton.cdiv(n, block_n))
    _int4_matmul_kernel[grid](x, qweight, scales, scaled_zeros, g_idx, out, m, n, k,
                              BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=64)
    return out

"""A Triton W4A16 GEMM for INT4 weights: each tile of 4-bit values is unpacked, scaled in registers and multiplied
in the activations' dtype, so the weights cross memory as 4-bit at every batch size (a dequantized copy per forward
cost more than the GEMM it fed). Layout (GPTQ's, which AWQ converts to at load): `qweight` int32 [in / 8, out], 8
input rows per int32, lowest nibble first; `scales` and `scaled_zeros` (zero point * scale) [groups, out], group g
holding input rows [g * group_size, (g + 1) * group_size) — act-order checkpoints are permuted into that order at
load (`Int4Shard.perm`). w = value * scale - scaled_zero.

Runs on CUDA, and on CPU under TRITON_INTERPRET=1 (tests)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _int4_matmul_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, out_ptr,
    M, N, K, stride_x,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    shifts = (tl.arange(0, BLOCK_K) % 8) * 4  # [BLOCK_K]: a row's nibble in its int32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # K is a multiple of GROUP, GROUP of BLOCK_K: a tile lies in one group
        offs_k = k0 + tl.arange(0, BLOCK_K)
        packed = tl.load(qweight_ptr + (offs_k // 8)[:, None] * N + offs_n[None, :], mask=mask_n[None, :],
                         other=0)  # [BLOCK_K, BLOCK_N] int32
        values = ((packed >> shifts[:, None]) & 0xF).to(tl.float32)
        group = k0 // GROUP
        scale = tl.load(scales_ptr + group * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)  # [BLOCK_N]
        zero = tl.load(zeros_ptr + group * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        w = (values * scale[None, :] - zero[None, :]).to(x.dtype)  # [BLOCK_K, BLOCK_N]
        acc += tl.dot(x, w)
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, scaled_zeros: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """x [M, K] times the INT4 weights (groups in input order) -> [M, N] in x's dtype."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    m, k = x.shape
    n = qweight.shape[1]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_m = min(128, max(16, triton.next_power_of_2(m)))
    block_n = 32 if m <= 16 else 64 if m <= 64 else 128  # small batches: more programs over the output
    block_k = min(group_size, 64)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int4_matmul_kernel[grid](x, qweight, scales, scaled_zeros, out, m, n, k, x.stride(0), GROUP=group_size,
                              BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out

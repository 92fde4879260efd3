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
    M, N, K, stride_x, TILES_PER_SPLIT,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    shifts = tl.arange(0, 8) * 4  # the 8 nibbles of an int32, lowest first
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * TILES_PER_SPLIT * BLOCK_K
    k_stop = tl.minimum(k_start + TILES_PER_SPLIT * BLOCK_K, K)
    for k0 in range(k_start, k_stop, BLOCK_K):  # K is a multiple of GROUP, GROUP of BLOCK_K: a tile is one group
        offs_p = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        packed = tl.load(qweight_ptr + offs_p[:, None] * N + offs_n[None, :], mask=mask_n[None, :],
                         other=0)  # [BLOCK_K / 8, BLOCK_N] int32, each loaded once
        values = (packed[:, None, :] >> shifts[None, :, None]) & 0xF  # [BLOCK_K / 8, 8, BLOCK_N]
        values = tl.reshape(values, (BLOCK_K, BLOCK_N)).to(tl.float32)  # row k0 + 8p + j
        group = k0 // GROUP
        scale = tl.load(scales_ptr + group * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)  # [BLOCK_N]
        zero = tl.load(zeros_ptr + group * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        w = (values * scale[None, :] - zero[None, :]).to(x.dtype)  # [BLOCK_K, BLOCK_N]
        acc += tl.dot(x, w)
    where = out_ptr + offs_m[:, None] * N + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if ATOMIC:  # split K: partial sums meet in a float32 output
        tl.atomic_add(where, acc, mask=mask)
    else:
        tl.store(where, acc.to(out_ptr.dtype.element_ty), mask=mask)


_TARGET_PROGRAMS = 512  # enough programs to keep every SM of a large GPU streaming weights


def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, scaled_zeros: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """x [M, K] times the INT4 weights (groups in input order) -> [M, N] in x's dtype. Small batches, which
    give too few output tiles to occupy the GPU, also split K across programs."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    m, k = x.shape
    n = qweight.shape[1]
    block_m = min(128, max(16, triton.next_power_of_2(m)))
    block_n = 64 if m <= 64 else 128
    block_k = min(group_size, 128 if m <= 16 else 64)
    tiles = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    k_tiles = k // block_k
    split = max(1, min(k_tiles, _TARGET_PROGRAMS // (tiles[0] * tiles[1])))
    per_split = triton.cdiv(k_tiles, split)
    split = triton.cdiv(k_tiles, per_split)
    out = torch.zeros((m, n), dtype=torch.float32, device=x.device) if split > 1 else \
        torch.empty((m, n), dtype=x.dtype, device=x.device)
    _int4_matmul_kernel[(*tiles, split)](x, qweight, scales, scaled_zeros, out, m, n, k, x.stride(0), per_split,
                                         GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                                         ATOMIC=split > 1)
    return out.to(x.dtype)

"""Triton kernels for batched multi-adapter LoRA (segmented, SGMV-style): one shrink and one expand launch per
layer serve every adapter of the step.

Tokens arrive grouped by slot (`LoRABatch`: segment g is a run of `token_indices` of one slot). A program
of the shrink kernel takes BLOCK_M tokens of one segment, BLOCK_N of the `n_slices * r_max` rank columns
and one split of the input dimension, loading A tiles of that one adapter; the expand kernel does the same
for (segment, slice) pairs over B and adds `scaling * h B^T` into the slice's output columns. The grid's
first axis numbers the chunks of all segments (`LoRABatch.chunk_ends`): exact in eager steps, an upper
bound in a CUDA graph, where lengths are unknown on the host and programs past the last chunk return.
Zero-padded ranks and slices an adapter leaves alone contribute exact zeros. Nothing is read on the host,
so the launches can be captured in a CUDA graph. Runs on CUDA, and on CPU under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loomserve.adapters.layers import LoRABatch


@triton.jit
def _chunk_position(chunk, chunk_end_ptr, seg_len_ptr, G, G_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """(segment, first token within it) of program `chunk`; segment G when the chunk is past the last one."""
    offs = tl.arange(0, G_POW2)
    ends = tl.load(chunk_end_ptr + offs, mask=offs < G, other=2**30)
    seg = tl.sum((ends <= chunk).to(tl.int32))
    safe = tl.minimum(seg, G - 1)
    seg_len = tl.load(seg_len_ptr + safe)
    first = tl.load(chunk_end_ptr + safe) - (seg_len + BLOCK_M - 1) // BLOCK_M
    return seg, (chunk - first) * BLOCK_M, seg_len


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, h_ptr, token_ptr, seg_slot_ptr, seg_start_ptr, seg_len_ptr, chunk_end_ptr,
    K, N, G, K_PER_SPLIT, stride_xm, stride_as, stride_an, stride_hs, stride_hm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, G_POW2: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """h[split, t, n] = sum over the split's k of x[t, k] * A[slot, n, k], for BLOCK_M tokens t of one segment."""
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    seg, m0, seg_len = _chunk_position(tl.program_id(0), chunk_end_ptr, seg_len_ptr, G, G_POW2, BLOCK_M)
    if seg >= G:  # a CUDA-graph grid covers the most chunks any batch of its size can have
        return
    start = tl.load(seg_start_ptr + seg)
    slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k_start = split * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < seg_len
    tokens = tl.load(token_ptr + start + offs_m, mask=mask_m, other=0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        x = tl.load(x_ptr + tokens[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [M, K]
        a = tl.load(a_ptr + slot * stride_as + offs_n[None, :] * stride_an + offs_k[:, None],
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # [K, N]
        acc += tl.dot(x, a, input_precision=PRECISION)
    tl.store(h_ptr + split * stride_hs + tokens[:, None] * stride_hm + offs_n[None, :], acc,
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _expand_kernel(
    h_ptr, b_ptr, y_ptr, scaling_ptr, slice_offsets_ptr, token_ptr, seg_slot_ptr, seg_start_ptr, seg_len_ptr,
    chunk_end_ptr, R, G, SPLIT_K, stride_hs, stride_hm, stride_bs, stride_bn, stride_ym, stride_ss,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, G_POW2: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """y[t, off_s + n] += scaling[slot, s] * sum_k h[t, s * R + k] * B[slot, off_s + n, k], h summed over splits."""
    pid_n = tl.program_id(1)
    s = tl.program_id(2)
    seg, m0, seg_len = _chunk_position(tl.program_id(0), chunk_end_ptr, seg_len_ptr, G, G_POW2, BLOCK_M)
    if seg >= G:
        return
    offset = tl.load(slice_offsets_ptr + s)
    size = tl.load(slice_offsets_ptr + s + 1) - offset
    if pid_n * BLOCK_N >= size:
        return
    start = tl.load(seg_start_ptr + seg)
    slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
    scale = tl.load(scaling_ptr + slot * stride_ss + s)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < size
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < seg_len
    tokens = tl.load(token_ptr + start + offs_m, mask=mask_m, other=0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, R, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < R
        h = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for split in range(SPLIT_K):  # the shrink's partial sums, always added in the same order
            h += tl.load(h_ptr + split * stride_hs + tokens[:, None] * stride_hm + s * R + offs_k[None, :],
                         mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [M, K]
        b = tl.load(b_ptr + slot * stride_bs + (offset + offs_n)[None, :] * stride_bn + offs_k[:, None],
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # [K, N]
        acc += tl.dot(h.to(b.dtype), b, input_precision=PRECISION)
    y_ptrs = y_ptr + tokens[:, None] * stride_ym + offset + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc * scale).to(y_ptr.dtype.element_ty), mask=mask)


def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(n)))


_NUM_SMS: dict[str, int] = {}


def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill (a small stand-in under the CPU interpreter)."""
    if device.type != "cuda":
        return 4
    key = str(device)
    if key not in _NUM_SMS:
        _NUM_SMS[key] = torch.cuda.get_device_properties(device).multi_processor_count
    return _NUM_SMS[key]


def lora_triton(
    y: torch.Tensor,  # [T, out]
    x: torch.Tensor,  # [T, in]
    lora_a: torch.Tensor,  # [slots, n_slices * r_max, in]
    lora_b: torch.Tensor,  # [slots, out, r_max]
    scaling: torch.Tensor,  # [slots, n_slices] float32
    slice_offsets: torch.Tensor,  # [n_slices + 1] int32
    max_slice: int,  # rows of the largest slice
    r_max: int,
    batch: LoRABatch,
) -> None:
    """The same function as `ops.lora_torch`, in two kernel launches. With few tokens per adapter (decode), the
    shrink also splits the input dimension over programs (`split_k`), each writing its own partial sums,
    which the expand adds up in a fixed order: the result does not depend on scheduling."""
    x = x.contiguous()
    num_slices = slice_offsets.numel() - 1
    k, n = x.shape[1], lora_a.shape[1]
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    num_segments = batch.segment_slots.numel()
    g_pow2 = triton.next_power_of_2(num_segments)
    block_m, chunks = batch.block_m, batch.num_chunks
    block_n, block_k = _block(n, 64), _block(k, 64)
    programs = chunks * triton.cdiv(n, block_n)
    split_k = max(1, min(triton.cdiv(k, 4 * block_k), 2 * _num_sms(x.device) // programs))
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    h = torch.empty(split_k, x.shape[0], n, dtype=torch.float32, device=x.device)  # [splits, T, n] partial sums
    _shrink_kernel[(chunks, triton.cdiv(n, block_n), split_k)](
        x, lora_a, h, batch.token_indices, batch.segment_slots, batch.segment_starts, batch.segment_lens,
        batch.chunk_ends, k, n, num_segments, k_per_split, x.stride(0), lora_a.stride(0), lora_a.stride(1),
        h.stride(0), h.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, G_POW2=g_pow2, PRECISION=precision,
    )
    block_n, block_k = _block(max_slice, 128), _block(r_max, 64)
    _expand_kernel[(chunks, triton.cdiv(max_slice, block_n), num_slices)](
        h, lora_b, y, scaling, slice_offsets, batch.token_indices, batch.segment_slots, batch.segment_starts,
        batch.segment_lens, batch.chunk_ends, r_max, num_segments, split_k, h.stride(0), h.stride(1),
        lora_b.stride(0), lora_b.stride(1), y.stride(0), scaling.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, G_POW2=g_pow2, PRECISION=precision,
    )

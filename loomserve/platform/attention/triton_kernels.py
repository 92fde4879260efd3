"""Triton kernels for paged attention: one varlen kernel for mixed prefill/decode batches, and the
fused write of new keys and values into the cache through the slot mapping.

Each program of the attention kernel handles one KV head and a tile of BLOCK_Q query tokens of one
sequence; the tile's rows are (query token, query head of that KV head's group) pairs, so grouped
query heads share every key and value load. Softmax is online (flash-attention style) in float32.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def write_kv_kernel(
    k_ptr, v_ptr,  # [T, Hkv * D] rows (may be strided views)
    k_cache_ptr, v_cache_ptr,  # [num_slots, Hkv * D] contiguous
    slot_ptr,  # [T] int64; negative = padding, skip
    stride_k, stride_v,
    ROW: tl.constexpr, ROW_PAD: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    offs = tl.arange(0, ROW_PAD)
    mask = offs < ROW
    k = tl.load(k_ptr + t * stride_k + offs, mask=mask)
    v = tl.load(v_ptr + t * stride_v + offs, mask=mask)
    tl.store(k_cache_ptr + slot * ROW + offs, k, mask=mask)
    tl.store(v_cache_ptr + slot * ROW + offs, v, mask=mask)


@triton.jit
def _find_seq(query_start_loc_ptr, seq_offset, num_seqs, tile, BLOCK_Q: tl.constexpr):
    """The sequence whose tiles contain `tile`: sequence s starts at tile (q_start(s) - q_start(0)) // BLOCK_Q + s."""
    base = tl.load(query_start_loc_ptr + seq_offset)
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi + 1) // 2
        start = (tl.load(query_start_loc_ptr + seq_offset + mid) - base) // BLOCK_Q + mid
        if start <= tile:
            lo = mid
        else:
            hi = mid - 1
    return lo


@triton.jit
def paged_attention_kernel(
    out_ptr, q_ptr,  # [T, H, D]
    k_cache_ptr, v_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    block_tables_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int32
    query_start_loc_ptr,  # [B + 1] int32
    seq_offset, num_seqs,  # this launch covers sequences [seq_offset, seq_offset + num_seqs)
    scale,
    stride_q_t, stride_q_h, stride_o_t, stride_o_h,
    stride_c_blk, stride_c_tok, stride_c_head,
    stride_bt,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # query tokens per tile
    BLOCK_N: tl.constexpr,  # keys per iteration
    IS_DECODE: tl.constexpr,  # one query token per sequence: tile == sequence
    PRECISION: tl.constexpr,  # "ieee" for float32 (no TF32), "tf32" otherwise (unused for 16-bit inputs)
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    if IS_DECODE:
        s = tile
    else:
        s = _find_seq(query_start_loc_ptr, seq_offset, num_seqs, tile, BLOCK_Q)
    if s >= num_seqs:
        return
    seq = seq_offset + s
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if IS_DECODE:
        q_first = 0
    else:
        base = tl.load(query_start_loc_ptr + seq_offset)
        q_first = (tile - ((q_start - base) // BLOCK_Q + s)) * BLOCK_Q
    if q_first >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len  # tokens already in the cache before this step's

    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    rows = tl.arange(0, BLOCK_M)
    q_idx = q_first + rows // GROUP_PAD  # query token within the sequence's new tokens
    g = rows % GROUP_PAD
    row_ok = (q_idx < q_len) & (g < GROUP)
    head = kv_head * GROUP + g
    q_pos = context + q_idx  # absolute position: attends to keys at positions <= q_pos
    d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = d < HEAD_DIM

    q_rows = q_ptr + (q_start + q_idx)[:, None] * stride_q_t + head[:, None] * stride_q_h + d[None, :]
    q = tl.load(q_rows, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [M, D]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    qk_scale = scale * 1.4426950408889634  # softmax in base 2
    kv_end = context + tl.minimum(q_first + BLOCK_Q, q_len)
    for start in range(0, kv_end, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        k_ok = k_pos < kv_end
        blk = tl.load(block_tables_ptr + seq * stride_bt + k_pos // BLOCK_SIZE, mask=k_ok, other=0)
        off = blk.to(tl.int64) * stride_c_blk + (k_pos % BLOCK_SIZE) * stride_c_tok + kv_head * stride_c_head
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [N, D]
        v = tl.load(v_cache_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [N, D]
        s_ij = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [M, N]
        visible = row_ok[:, None] & k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
        s_ij = tl.where(visible, s_ij, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s_ij, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet
        p = tl.exp2(s_ij - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    o_rows = out_ptr + (q_start + q_idx)[:, None] * stride_o_t + head[:, None] * stride_o_h + d[None, :]
    tl.store(o_rows, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

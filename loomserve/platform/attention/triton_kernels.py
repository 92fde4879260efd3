"""Triton kernels for paged attention: one varlen kernel for mixed prefill/decode batches, the combine of
its KV splits, and the fused write of new keys and values into the cache through the slot mapping.

An fp8 cache (KV_FP8) holds keys and values divided by their layer's scales (`kv_quant.py`): the write divides and
saturates, the attention converts what it loads to the queries' dtype (exact from float8) and folds the scales into
the softmax scale (keys) and the tile's output (values), so the inner loop gains no multiply.

Each program of the attention kernel handles one KV head, a tile of query tokens of one sequence (a decode,
or BLOCK_Q tokens of a prefill chunk: both kinds in one launch, so the decodes' short programs run beside
the chunk's), and one split of the keys that tile sees; the tile's rows are (query token, query head of that
KV head's group) pairs, so grouped query heads share every key and value load. Softmax is online
(flash-attention style) in float32, and key blocks wholly before the tile's first position skip the causal
mask. A long context is cut into up to `num_splits` splits of at least SPLIT_MIN keys, each its own program
(flash-decoding): otherwise one program would walk the whole context alone while the rest of the GPU idles.
Splits land as normalized partial outputs with their log-sum-exp, and the combine kernel merges each token's
splits in one load; a tile whose context fits one split writes its output directly.

Which sequences a launch covers is read on the device (`seq_counts`), and grids may be larger than the
work (programs past it return), so one launch can be captured in a CUDA graph and replayed for any step
within its bounds.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def write_kv_kernel(
    k_ptr, v_ptr,  # [T, Hkv * D] rows (may be strided views)
    k_cache_ptr, v_cache_ptr,  # [num_slots, Hkv * D] contiguous
    slot_ptr,  # [T] int64; negative = padding, skip
    k_scale_ptr, v_scale_ptr,  # [] float32: the layer's scales (read only for an fp8 cache)
    stride_k, stride_v,
    ROW: tl.constexpr, ROW_PAD: tl.constexpr,
    KV_FP8: tl.constexpr, FP8_MAX: tl.constexpr,  # the cache is float8 of this largest finite value
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    offs = tl.arange(0, ROW_PAD)
    mask = offs < ROW
    k = tl.load(k_ptr + t * stride_k + offs, mask=mask)
    v = tl.load(v_ptr + t * stride_v + offs, mask=mask)
    if KV_FP8:
        k = tl.clamp(k.to(tl.float32) / tl.load(k_scale_ptr), -FP8_MAX, FP8_MAX)
        v = tl.clamp(v.to(tl.float32) / tl.load(v_scale_ptr), -FP8_MAX, FP8_MAX)
    tl.store(k_cache_ptr + slot * ROW + offs, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + slot * ROW + offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _find_seq(query_start_loc_ptr, seq_offset, num_seqs, index, BLOCK_Q: tl.constexpr, PER_TILE: tl.constexpr):
    """Which of the num_seqs sequences from seq_offset holds `index` (counted from the first one's start): a tile
    when PER_TILE (sequence s starts at tile (q_start(s) - q_start(0)) // BLOCK_Q + s), else a token; num_seqs
    for an index past them all (most of a CUDA graph's grid), found without the search."""
    base = tl.load(query_start_loc_ptr + seq_offset)
    end = tl.load(query_start_loc_ptr + seq_offset + num_seqs) - base
    if PER_TILE:
        end = end // BLOCK_Q + num_seqs
    lo = tl.where(index >= end, num_seqs, 0)
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi + 1) // 2
        start = tl.load(query_start_loc_ptr + seq_offset + mid) - base
        if PER_TILE:
            start = start // BLOCK_Q + mid
        if start <= index:
            lo = mid
        else:
            hi = mid - 1
    return lo


@triton.jit
def _locate_tile(query_start_loc_ptr, seq_counts_ptr, seq_lens_ptr, tile, num_splits,
                 IS_DECODE: tl.constexpr, BLOCK_Q: tl.constexpr, SPLIT_MIN: tl.constexpr, BLOCK_N: tl.constexpr):
    """A program's tile: (sequence, its first token in the batch, its new tokens, the tile's first new token,
    keys cached before the step, keys the tile sees, keys per split, whether the tile holds work). Decode
    launches cover the first seq_counts[0] sequences, prefill launches the rest up to seq_counts[1]."""
    num_decodes = tl.load(seq_counts_ptr).to(tl.int32)
    if IS_DECODE:
        first = 0
        count = num_decodes
        s = tile
    else:
        first = num_decodes
        count = tl.load(seq_counts_ptr + 1).to(tl.int32) - num_decodes
        s = _find_seq(query_start_loc_ptr, first, count, tile, BLOCK_Q, True)
    in_launch = s < count
    seq = first + tl.where(in_launch, s, 0)
    q_start = tl.load(query_start_loc_ptr + seq, mask=in_launch, other=0).to(tl.int32)
    q_len = tl.load(query_start_loc_ptr + seq + 1, mask=in_launch, other=0).to(tl.int32) - q_start
    if IS_DECODE:
        q_first = tile * 0
    else:
        base = tl.load(query_start_loc_ptr + first).to(tl.int32)
        q_first = (tile - ((q_start - base) // BLOCK_Q + s)) * BLOCK_Q
    has_work = in_launch & (q_first < q_len)
    seq_len = tl.load(seq_lens_ptr + seq, mask=has_work, other=0).to(tl.int32)
    context = seq_len - q_len  # tokens already in the cache before this step's
    kv_end = context + tl.minimum(q_first + BLOCK_Q, q_len)
    split_len = _split_len(kv_end, num_splits, SPLIT_MIN, BLOCK_N)
    return seq, q_start, q_len, q_first, context, kv_end, split_len, has_work


@triton.jit
def _tile_rows(q_first, q_len, kv_head, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
               HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """A tile's rows, (query token, query head of the KV head's group) pairs: each row's token within the
    sequence's new tokens [M], its head [M], whether it is real [M], and the head dims [D] with their mask."""
    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    q_idx = q_first + rows // GROUP_PAD
    g = rows % GROUP_PAD
    row_ok = (q_idx < q_len) & (g < GROUP)
    d = tl.arange(0, HEAD_DIM_PAD)
    return q_idx, kv_head * GROUP + g, row_ok, d, d < HEAD_DIM


@triton.jit
def _split_len(kv_end, num_splits, SPLIT_MIN: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys per split for a tile seeing kv_end keys: at most num_splits splits, each a whole number of key blocks."""
    even = tl.cdiv(tl.cdiv(kv_end, num_splits), BLOCK_N) * BLOCK_N
    return tl.maximum(even, SPLIT_MIN)


@triton.jit
def _attend_block(q, m_i, l_i, acc, start, kv_stop, q_pos, row_ok, kv_row, k_cache_ptr, v_cache_ptr, kv_head,
                  stride_c_blk, stride_c_tok, stride_c_head, qk_scale, d, d_ok,
                  BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                  HEAD_DIM_PAD: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr, KV_FP8: tl.constexpr):
    """One online-softmax step over BLOCK_N keys from `start`: the running max [M], sum [M] and output [M, D].
    Unmasked blocks lie wholly before every row's position and inside the split."""
    k_pos = start + tl.arange(0, BLOCK_N)
    if MASKED:
        k_ok = k_pos < kv_stop
        blk = tl.load(kv_row + k_pos // BLOCK_SIZE, mask=k_ok, other=0)
    else:
        blk = tl.load(kv_row + k_pos // BLOCK_SIZE)
    off = blk.to(tl.int64) * stride_c_blk + (k_pos % BLOCK_SIZE) * stride_c_tok + kv_head * stride_c_head
    kv_ptrs = off[:, None] + d[None, :]
    if MASKED:
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + kv_ptrs, mask=kv_mask, other=0.0)  # [N, D]
        v = tl.load(v_cache_ptr + kv_ptrs, mask=kv_mask, other=0.0)  # [N, D]
    elif HEAD_DIM == HEAD_DIM_PAD:
        k = tl.load(k_cache_ptr + kv_ptrs)
        v = tl.load(v_cache_ptr + kv_ptrs)
    else:
        k = tl.load(k_cache_ptr + kv_ptrs, mask=d_ok[None, :], other=0.0)
        v = tl.load(v_cache_ptr + kv_ptrs, mask=d_ok[None, :], other=0.0)
    if KV_FP8:  # stored / scale: the scales are applied to the scores and the output
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    s_ij = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [M, N], unscaled
    if MASKED:
        visible = row_ok[:, None] & k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
        s_ij = tl.where(visible, s_ij * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s_ij, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet
        p = tl.exp2(s_ij - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
    else:
        # Scale and shift in one multiply-add; every row sees these keys, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s_ij, 1) * qk_scale)
        p = tl.exp2(s_ij * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attend_tile(
    tile, kv_head, split,
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr, seq_lens_ptr,
    query_start_loc_ptr, seq_counts_ptr, part_out_ptr, part_lse_ptr, num_splits, scale,
    stride_q_t, stride_q_h, stride_o_t, stride_o_h, stride_c_blk, stride_c_tok, stride_c_head, stride_bt,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT_MIN: tl.constexpr, IS_DECODE: tl.constexpr, PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
):
    """One program's work: one split of the keys of one tile (decode: a sequence) for one KV head's query heads,
    written as the output itself when the tile has one split, else as a partial output for the combine."""
    seq, q_start, q_len, q_first, context, kv_end, split_len, has_work = _locate_tile(
        query_start_loc_ptr, seq_counts_ptr, seq_lens_ptr, tile, num_splits, IS_DECODE, BLOCK_Q, SPLIT_MIN, BLOCK_N)
    kv_start = split * split_len
    if has_work & (kv_start < kv_end):
        kv_stop = tl.minimum(kv_start + split_len, kv_end)
        BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
        q_idx, head, row_ok, d, d_ok = _tile_rows(q_first, q_len, kv_head, GROUP, GROUP_PAD, BLOCK_Q, HEAD_DIM,
                                                  HEAD_DIM_PAD)
        q_pos = context + q_idx  # absolute position: attends to keys at positions <= q_pos
        q_rows = q_ptr + (q_start + q_idx)[:, None] * stride_q_t + head[:, None] * stride_q_h + d[None, :]
        q = tl.load(q_rows, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [M, D]

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
        qk_scale = scale * 1.4426950408889634  # softmax in base 2
        if KV_FP8:
            qk_scale = qk_scale * tl.load(k_scale_ptr)
        kv_row = block_tables_ptr + seq * stride_bt
        # Keys before the tile's first query position are seen by every row: those whole blocks skip the masks,
        # which (with the exp) bound the loop at head_dim 64. Only the causal edge and the split's tail are masked.
        open_end = tl.maximum(kv_start, tl.minimum(kv_stop, context + q_first + 1) // BLOCK_N * BLOCK_N)
        for start in range(kv_start, open_end, BLOCK_N):
            m_i, l_i, acc = _attend_block(q, m_i, l_i, acc, start, kv_stop, q_pos, row_ok, kv_row, k_cache_ptr,
                                          v_cache_ptr, kv_head, stride_c_blk, stride_c_tok, stride_c_head, qk_scale,
                                          d, d_ok, BLOCK_SIZE, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, PRECISION, False,
                                          KV_FP8)
        for start in range(open_end, kv_stop, BLOCK_N):
            m_i, l_i, acc = _attend_block(q, m_i, l_i, acc, start, kv_stop, q_pos, row_ok, kv_row, k_cache_ptr,
                                          v_cache_ptr, kv_head, stride_c_blk, stride_c_tok, stride_c_head, qk_scale,
                                          d, d_ok, BLOCK_SIZE, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, PRECISION, True,
                                          KV_FP8)
        token = q_start + q_idx
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        if KV_FP8:
            out = out * tl.load(v_scale_ptr)
        out_mask = row_ok[:, None] & d_ok[None, :]
        if split_len >= kv_end:  # the tile's only split: the output itself
            o_rows = out_ptr + token[:, None] * stride_o_t + head[:, None] * stride_o_h + d[None, :]
            tl.store(o_rows, out.to(out_ptr.dtype.element_ty), mask=out_mask)
        else:
            # A row whose causal window ends before this split sees nothing here: weight 0 in the combine.
            lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
            part = (token * (GROUP * tl.num_programs(1)) + head) * num_splits + split  # [M]
            tl.store(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :], out, mask=out_mask)
            tl.store(part_lse_ptr + part, lse, mask=row_ok)


# Arguments that change from step to step are not specialized on (Triton would compile a variant for values
# divisible by 16 and for 1): the kernels captured in CUDA graphs at start-up then serve eager steps too,
# instead of a compile stalling every stream the first time a step's block-table width or split count differs.
@triton.jit(do_not_specialize=["num_splits", "stride_bt", "decode_tiles"])
def paged_attention_kernel(
    out_ptr, q_ptr,  # [T, H, D]
    k_cache_ptr, v_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    k_scale_ptr, v_scale_ptr,  # [] float32: the layer's scales (read only for an fp8 cache)
    block_tables_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int32
    query_start_loc_ptr,  # [B + 1] int32
    seq_counts_ptr,  # [2]: (decodes, sequences) this step
    part_out_ptr,  # [T, H, num_splits, D] float32: each split's normalized output (num_splits > 1 only)
    part_lse_ptr,  # [T, H, num_splits] float32: each split's log2-sum-exp2 of its scores
    decode_tiles,  # the grid's first decode_tiles tiles are decodes (a bound: those past the step's return)
    num_splits,
    scale,
    stride_q_t, stride_q_h, stride_o_t, stride_o_h,
    stride_c_blk, stride_c_tok, stride_c_head,
    stride_bt,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    SPLIT_MIN: tl.constexpr,  # fewest keys a split takes (a multiple of both BLOCK_Ns)
    DECODE_BLOCK_Q: tl.constexpr, DECODE_BLOCK_N: tl.constexpr,  # query tokens per tile, keys per iteration
    PREFILL_BLOCK_Q: tl.constexpr, PREFILL_BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for float32 (no TF32), "tf32" otherwise (unused for 16-bit inputs)
    HAS_PREFILL: tl.constexpr,  # False: decodes only, compiled without the prefill path and its registers
    KV_FP8: tl.constexpr,  # the cache holds float8 keys and values, divided by their scales
):
    """Decodes and prefill chunks in one launch, each with its own tile shape: the decodes' short programs run
    beside the chunk's instead of before it."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if HAS_PREFILL:
        if tile >= decode_tiles:
            _attend_tile(tile - decode_tiles, kv_head, split, out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr,
                         v_scale_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, seq_counts_ptr, part_out_ptr,
                         part_lse_ptr, num_splits, scale, stride_q_t, stride_q_h, stride_o_t, stride_o_h, stride_c_blk,
                         stride_c_tok, stride_c_head, stride_bt, GROUP, GROUP_PAD, BLOCK_SIZE, HEAD_DIM, HEAD_DIM_PAD,
                         PREFILL_BLOCK_Q, PREFILL_BLOCK_N, SPLIT_MIN, False, PRECISION, KV_FP8)
            return
    _attend_tile(tile, kv_head, split, out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
                 block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, seq_counts_ptr, part_out_ptr, part_lse_ptr,
                 num_splits, scale, stride_q_t, stride_q_h, stride_o_t, stride_o_h, stride_c_blk, stride_c_tok,
                 stride_c_head, stride_bt, GROUP, GROUP_PAD, BLOCK_SIZE, HEAD_DIM, HEAD_DIM_PAD, DECODE_BLOCK_Q,
                 DECODE_BLOCK_N, SPLIT_MIN, True, PRECISION, KV_FP8)


@triton.jit(do_not_specialize=["num_splits"])
def combine_splits_kernel(
    out_ptr,  # [T, H, D]
    part_out_ptr, part_lse_ptr,  # as paged_attention_kernel wrote them
    seq_lens_ptr, query_start_loc_ptr, seq_counts_ptr,
    num_splits,
    stride_o_t, stride_o_h,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    SPLIT_MIN: tl.constexpr, MAX_SPLITS: tl.constexpr,  # MAX_SPLITS: a power of two >= num_splits
    DECODE_BLOCK_N: tl.constexpr, PREFILL_BLOCK_Q: tl.constexpr, PREFILL_BLOCK_N: tl.constexpr,
):
    """Merge the splits of one token's query heads of one KV head, weighting each split's output by its share
    of the softmax mass. One launch covers the step's decodes and prefill chunks; all of a token's splits are
    loaded at once (one trip to memory, not one per split), and tokens whose tile had one split return."""
    token = tl.program_id(0)
    kv_head = tl.program_id(1)
    num_decodes = tl.load(seq_counts_ptr).to(tl.int32)
    count = tl.load(seq_counts_ptr + 1).to(tl.int32)
    if token >= tl.load(query_start_loc_ptr + count):
        return
    if token < num_decodes:
        seq = token
    else:
        # Decodes hold one token each, so the prefill tokens start at token num_decodes.
        seq = num_decodes + _find_seq(query_start_loc_ptr, num_decodes, count - num_decodes, token - num_decodes,
                                      1, False)
    q_start = tl.load(query_start_loc_ptr + seq).to(tl.int32)
    q_len = tl.load(query_start_loc_ptr + seq + 1).to(tl.int32) - q_start
    context = tl.load(seq_lens_ptr + seq).to(tl.int32) - q_len
    if token < num_decodes:
        kv_end = context + 1
        split_len = _split_len(kv_end, num_splits, SPLIT_MIN, DECODE_BLOCK_N)
    else:  # the keys of the token's prefill tile, as the attention launch cut them
        q_first = (token - q_start) // PREFILL_BLOCK_Q * PREFILL_BLOCK_Q
        kv_end = context + tl.minimum(q_first + PREFILL_BLOCK_Q, q_len)
        split_len = _split_len(kv_end, num_splits, SPLIT_MIN, PREFILL_BLOCK_N)
    if split_len >= kv_end:
        return
    used = tl.cdiv(kv_end, split_len)

    g = tl.arange(0, GROUP_PAD)
    head = kv_head * GROUP + g  # [G]
    split = tl.arange(0, MAX_SPLITS)  # [S]
    d = tl.arange(0, HEAD_DIM_PAD)
    part = (token * (GROUP * tl.num_programs(1)) + head)[:, None] * num_splits + split[None, :]  # [G, S]
    ok = (g < GROUP)[:, None] & (split < used)[None, :]
    # A split past a row's causal window holds lse -inf: weight 0.
    lse = tl.load(part_lse_ptr + part, mask=ok, other=float("-inf"))  # [G, S]
    m = tl.max(lse, 1)
    m = tl.where(m == float("-inf"), 0.0, m)  # padded heads
    w = tl.exp2(lse - m[:, None])  # [G, S]
    total = tl.sum(w, 1)
    parts = tl.load(part_out_ptr + part[:, :, None] * HEAD_DIM + d[None, None, :],
                    mask=ok[:, :, None] & (d < HEAD_DIM)[None, None, :], other=0.0)  # [G, S, D]
    out = tl.sum(parts * w[:, :, None], 1) / tl.where(total == 0.0, 1.0, total)[:, None]  # [G, D]
    o_rows = out_ptr + token * stride_o_t + head[:, None] * stride_o_h + d[None, :]
    tl.store(o_rows, out.to(out_ptr.dtype.element_ty), mask=(g < GROUP)[:, None] & (d < HEAD_DIM)[None, :])

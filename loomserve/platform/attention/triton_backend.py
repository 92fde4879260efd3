"""The CUDA attention backend: Triton kernels for the KV write and the paged attention.

Decodes (one query token each) and prefill chunks share one launch with different tile shapes: decodes
take one sequence per program, prefill chunks BLOCK_Q tokens per program; one more launch merges the KV
splits. Grids and the number of KV splits come from the metadata's launch bounds, so a launch captured in a
CUDA graph covers every step the graph may replay.
"""

from __future__ import annotations

import torch
import triton
from torch import nn

from loomserve.platform.attention.kv_quant import KVScales, is_fp8
from loomserve.platform.attention.metadata import AttentionMetadata
from loomserve.platform.attention.triton_kernels import combine_splits_kernel, paged_attention_kernel, write_kv_kernel

_PREFILL_ROWS = 64  # rows (query token x grouped head) per prefill tile
_BLOCK_N = 64
_SPLIT_MIN = 128  # keys: a context this short is one program's work
_MAX_SPLITS = 16
_SPLIT_BUFFER_BYTES = 64 << 20  # bound on a launch's float32 partial outputs


class TritonAttentionBackend(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 split_min: int = _SPLIT_MIN, prefill_rows: int = _PREFILL_ROWS, prefill_block_n: int = _BLOCK_N,
                 num_warps: int = 4) -> None:
        super().__init__()
        self.kv_scales = KVScales()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        if split_min % max(_BLOCK_N, prefill_block_n):
            raise ValueError(f"split_min {split_min} must be a multiple of the key block ({prefill_block_n})")
        self.split_min = split_min
        self.group = num_heads // num_kv_heads
        self.num_warps = num_warps
        group_pad = max(triton.next_power_of_2(self.group), 1)
        self.decode_block_q = max(1, 16 // group_pad)  # tl.dot wants at least 16 rows
        self.prefill_block_q = max(self.decode_block_q, prefill_rows // group_pad)
        # The attention launch and the combine cut tiles and splits alike.
        self.consts = dict(GROUP=self.group, GROUP_PAD=group_pad, HEAD_DIM=head_dim,
                           HEAD_DIM_PAD=triton.next_power_of_2(head_dim), SPLIT_MIN=split_min,
                           DECODE_BLOCK_N=_BLOCK_N, PREFILL_BLOCK_Q=self.prefill_block_q,
                           PREFILL_BLOCK_N=prefill_block_n)

    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, H * D]
        if meta.calculate_kv_scales:
            self.kv_scales.calculate(k, v)
        write_kv(kv_cache, k, v, meta.slot_mapping, self.kv_scales)
        out = torch.empty_like(q)
        bounds = meta.launch_bounds()
        splits = self.num_splits(bounds.max_seq_len, q.shape[0])
        # Split outputs are indexed by the token's row in the batch: [T, H, splits, D] and [T, H, splits].
        # With one split nothing is written there, but the pointers keep their type (one compiled kernel).
        shape = (q.shape[0], self.num_heads, splits) if splits > 1 else (1, 1, 1)
        parts = (q.new_empty((*shape, self.head_dim), dtype=torch.float32), q.new_empty(shape, dtype=torch.float32))
        # Sequence s's prefill tiles start at its first token // block_q + s: an upper bound; extra programs return.
        prefill_tiles = bounds.prefill_tokens // self.prefill_block_q + bounds.prefills if bounds.prefills else 0
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        paged_attention_kernel[(bounds.decodes + prefill_tiles, self.num_kv_heads, splits)](
            out, q, k_cache, v_cache, self.kv_scales.k_scale, self.kv_scales.v_scale,
            meta.block_tables, meta.seq_lens, meta.query_start_loc, meta.seq_counts,
            *parts, bounds.decodes, splits, self.scale,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            meta.block_tables.stride(0),
            BLOCK_SIZE=k_cache.shape[1], DECODE_BLOCK_Q=self.decode_block_q,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32", HAS_PREFILL=prefill_tiles > 0,
            KV_FP8=is_fp8(kv_cache.dtype), **self.consts,
            num_warps=self.num_warps,
            num_stages=2,  # splits are a few key blocks long: 2 stages beat Triton's default 3 on an H200
        )
        if splits > 1:
            combine_splits_kernel[(bounds.decodes + bounds.prefill_tokens, self.num_kv_heads)](
                out, *parts, meta.seq_lens, meta.query_start_loc, meta.seq_counts, splits,
                out.stride(0), out.stride(1), MAX_SPLITS=_MAX_SPLITS, **self.consts,
            )
        return out.flatten(1)

    def num_splits(self, max_seq_len: int, num_tokens: int) -> int:
        """KV splits per tile for a launch: enough that no program walks more than ~split_min keys of the longest
        context, within the partial-output buffer's bound."""
        by_len = triton.cdiv(max_seq_len, self.split_min)
        by_buffer = _SPLIT_BUFFER_BYTES // max(1, num_tokens * self.num_heads * self.head_dim * 4)
        return max(1, min(_MAX_SPLITS, by_len, by_buffer))


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             scales: KVScales) -> None:
    """Store [T, Hkv, D] keys and values at their slots in one kernel (quantized, into an fp8 cache); slot -1
    (padding) is skipped."""
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    row = k.shape[1] * k.shape[2]
    fp8 = is_fp8(kv_cache.dtype)
    k2, v2 = k.reshape(num_tokens, row), v.reshape(num_tokens, row)
    write_kv_kernel[(num_tokens,)](
        k2, v2, kv_cache[0], kv_cache[1], slot_mapping, scales.k_scale, scales.v_scale, k2.stride(0), v2.stride(0),
        ROW=row, ROW_PAD=triton.next_power_of_2(row), KV_FP8=fp8,
        FP8_MAX=torch.finfo(kv_cache.dtype).max if fp8 else 0.0,
    )

"""The CUDA attention backend: Triton kernels for the KV write and the paged attention.

Decodes (one query token each) and prefill chunks are the same kernel with different tile shapes:
decodes take one sequence per program, prefill chunks BLOCK_Q tokens per program.
"""

from __future__ import annotations

import torch
import triton

from loomserve.platform.attention.metadata import AttentionMetadata
from loomserve.platform.attention.triton_kernels import paged_attention_kernel, write_kv_kernel

_PREFILL_ROWS = 64  # rows (query token x grouped head) per prefill tile
_BLOCK_N = 64


class TritonAttentionBackend:
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.group = num_heads // num_kv_heads
        self.group_pad = max(triton.next_power_of_2(self.group), 1)
        self.head_dim_pad = triton.next_power_of_2(head_dim)
        self.decode_block_q = max(1, 16 // self.group_pad)  # tl.dot wants at least 16 rows
        self.prefill_block_q = max(self.decode_block_q, _PREFILL_ROWS // self.group_pad)

    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, H * D]
        write_kv(kv_cache, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        if meta.num_decodes:
            self._launch(out, q, kv_cache, meta, 0, meta.num_decodes, decode=True)
        num_prefills = meta.num_seqs - meta.num_decodes
        if num_prefills:
            self._launch(out, q, kv_cache, meta, meta.num_decodes, num_prefills, decode=False)
        return out.flatten(1)

    def _launch(self, out, q, kv_cache, meta: AttentionMetadata, first: int, count: int, decode: bool) -> None:
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        block_q = self.decode_block_q if decode else self.prefill_block_q
        if decode:
            tiles = count
        else:
            num_tokens = meta.query_start_loc_cpu[first + count] - meta.query_start_loc_cpu[first]
            tiles = num_tokens // block_q + count  # an upper bound; extra programs exit at once
        paged_attention_kernel[(tiles, self.num_kv_heads)](
            out, q, k_cache, v_cache,
            meta.block_tables, meta.seq_lens, meta.query_start_loc,
            first, count, self.scale,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            meta.block_tables.stride(0),
            GROUP=self.group, GROUP_PAD=self.group_pad, BLOCK_SIZE=k_cache.shape[1],
            HEAD_DIM=self.head_dim, HEAD_DIM_PAD=self.head_dim_pad,
            BLOCK_Q=block_q, BLOCK_N=_BLOCK_N, IS_DECODE=decode,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        )


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store [T, Hkv, D] keys and values at their slots in one kernel; slot -1 (padding) is skipped."""
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    row = k.shape[1] * k.shape[2]
    k2, v2 = k.reshape(num_tokens, row), v.reshape(num_tokens, row)
    write_kv_kernel[(num_tokens,)](
        k2, v2, kv_cache[0], kv_cache[1], slot_mapping, k2.stride(0), v2.stride(0),
        ROW=row, ROW_PAD=triton.next_power_of_2(row),
    )

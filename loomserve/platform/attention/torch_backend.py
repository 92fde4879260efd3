"""The reference paged attention in plain torch, for mixed prefill/decode batches, on CPU and CUDA.

The KV cache of a layer is one tensor `[2, num_blocks, block_size, num_kv_heads, head_dim]`. New K/V
are written through `slot_mapping`; then decodes attend in one batched call over their gathered
blocks, and each prefill chunk attends causally to its whole context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loomserve.platform.attention.metadata import AttentionMetadata


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store this step's keys and values ([T, Hkv, D]) at their cache slots."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of the first `length` positions of a sequence's blocks table."""
    block_size = kv_cache.shape[2]
    num_blocks = -(-length // block_size)
    blocks = kv_cache[:, block_table[:num_blocks].long()]  # [2, n, block_size, Hkv, D]
    kv = blocks.flatten(1, 2)[:, :length]  # [2, length, Hkv, D]
    return kv[0], kv[1]


class TorchAttentionBackend:
    """Paged attention with torch's scaled_dot_product_attention; GQA by grouping query heads."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

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
            out[: meta.num_decode_tokens] = self._decode(q[: meta.num_decode_tokens], kv_cache, meta)
        for i in range(meta.num_decodes, meta.num_seqs):
            start, end = meta.query_start_loc_cpu[i], meta.query_start_loc_cpu[i + 1]
            out[start:end] = self._prefill(q[start:end], kv_cache, meta.block_tables[i], meta.seq_lens_cpu[i])
        return out.flatten(1)

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """One new token per sequence: attend over each sequence's blocks, padding masked out."""
        b = meta.num_decodes
        max_len = max(meta.seq_lens_cpu[:b])
        block_size = kv_cache.shape[2]
        num_blocks = -(-max_len // block_size)
        tables = meta.block_tables[:b, :num_blocks].long()
        kv = kv_cache[:, tables].flatten(2, 3)[:, :, :max_len]  # [2, B, L, Hkv, D]
        positions = torch.arange(max_len, device=q.device)
        mask = positions[None, :] < meta.seq_lens[:b, None].to(q.device)  # [B, L]
        # Slots past a sequence's end hold whatever was there (NaN/inf in never-written memory); masking
        # the scores alone still lets 0 * NaN into the output, so zero them.
        kv.masked_fill_(~mask[None, :, :, None, None], 0)
        out = self._sdpa(q[:, None], kv[0], kv[1], mask[:, None, None, :])  # [B, 1, H, D]
        return out[:, 0]

    def _prefill(self, q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int):
        """A chunk of `n` new tokens at the end of a `seq_len` context: causal over the whole context."""
        n = q.shape[0]
        k, v = gather_kv(kv_cache, block_table, seq_len)  # [L, Hkv, D]
        q_pos = torch.arange(seq_len - n, seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]  # [n, L]
        return self._sdpa(q[None], k[None], v[None], mask[None, None])[0]

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q [B, n, H, D], k/v [B, L, Hkv, D], mask broadcastable to [B, H, n, L] -> [B, n, H, D]."""
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2).to(q.dtype),
            v.transpose(1, 2).to(q.dtype),
            attn_mask=mask,
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return out.transpose(1, 2)

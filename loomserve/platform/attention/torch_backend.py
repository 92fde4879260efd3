"""The reference paged attention in plain torch, for mixed prefill/decode batches, on CPU and CUDA.

The KV cache of a layer is one tensor `[2, num_blocks, block_size, num_kv_heads, head_dim]`, in the model's dtype
or float8 (scaled by the layer's `KVScales`, `kv_quant.py`). New K/V are written through `slot_mapping`; then decodes
and short chunks (a decode verifying speculative drafts) attend in one batched call over their gathered blocks, and
each longer prefill chunk attends causally to its whole context on its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loomserve.platform.attention.batched_layout import batched_layout
from loomserve.platform.attention.kv_quant import KVScales, byte_view, dequantize, is_fp8, quantize
from loomserve.platform.attention.metadata import AttentionMetadata

_SHORT_QUERY = 16  # chunks of at most this many tokens are batched like decodes (padding stays small)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             scales: KVScales) -> None:
    """Store this step's keys and values ([T, Hkv, D]) at their cache slots (quantized, into an fp8 cache)."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    flat = byte_view(kv_cache).view(2, num_blocks * block_size, num_kv_heads, head_dim)
    if is_fp8(kv_cache.dtype):
        k, v = quantize(k, scales.k_scale, kv_cache.dtype), quantize(v, scales.v_scale, kv_cache.dtype)
    flat[0].index_copy_(0, slot_mapping, byte_view(k.to(kv_cache.dtype)))
    flat[1].index_copy_(0, slot_mapping, byte_view(v.to(kv_cache.dtype)))


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Keys and values [2, length, Hkv, D] of the first `length` positions of a sequence's blocks table."""
    block_size = kv_cache.shape[2]
    num_blocks = -(-length // block_size)
    blocks = kv_cache[:, block_table[:num_blocks].long()]  # [2, n, block_size, Hkv, D]
    return blocks.flatten(1, 2)[:, :length]


class TorchAttentionBackend(nn.Module):
    """Paged attention with torch's scaled_dot_product_attention; GQA by grouping query heads."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.kv_scales = KVScales()
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
        if meta.calculate_kv_scales:
            self.kv_scales.calculate(k, v)
        write_kv(kv_cache, k, v, meta.slot_mapping, self.kv_scales)
        out = torch.empty_like(q)
        qsl = meta.query_start_loc_cpu
        chunks = range(meta.num_decodes, meta.num_seqs)
        short = [i for i in chunks if qsl[i + 1] - qsl[i] <= _SHORT_QUERY]
        for seqs in (list(range(meta.num_decodes)), short):
            if seqs:
                self._batched(q, kv_cache, meta, seqs, out)
        for i in chunks:
            if qsl[i + 1] - qsl[i] > _SHORT_QUERY:
                out[qsl[i] : qsl[i + 1]] = self._prefill(q[qsl[i] : qsl[i + 1]], kv_cache, meta.block_tables[i],
                                                         meta.seq_lens_cpu[i])
        return out.flatten(1)

    def _batched(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, seqs: list[int],
                 out: torch.Tensor) -> None:
        """Sequences with few new tokens each (decodes, drafts being verified) in one call: their queries padded
        to the longest, each causal over its own positions (`batched_layout.py`), padding masked out; written into
        `out`."""
        _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
        layout = batched_layout(meta, seqs, block_size, q.shape[0])
        flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
        k, v = (flat[i].index_select(0, layout.slots).view(layout.b, layout.L, num_kv_heads, head_dim) for i in (0, 1))
        if is_fp8(kv_cache.dtype):
            k, v = self._read(torch.stack((k, v)), q.dtype)
        if layout.first_row is not None:  # one query per sequence, in consecutive rows (decodes)
            rows = slice(layout.first_row, layout.first_row + layout.b)
            out[rows] = self._grouped(q[rows], k, v, layout.mask)
            return
        attended = self._sdpa(q[layout.rows], k, v, layout.mask)  # [b, Q, H, D]
        out[layout.rows[layout.real]] = attended[layout.real]

    def _prefill(self, q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int):
        """A chunk of `n` new tokens at the end of a `seq_len` context: causal over the whole context."""
        n = q.shape[0]
        k, v = self._read(gather_kv(kv_cache, block_table, seq_len), q.dtype)  # [L, Hkv, D] each
        q_pos = torch.arange(seq_len - n, seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]  # [n, L]
        return self._sdpa(q[None], k[None], v[None], mask[None, None])[0]

    def _read(self, kv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Gathered cache rows [2, ...] as the queries' dtype: dequantized from fp8, each half by its scale."""
        if not is_fp8(kv.dtype):
            return kv.to(dtype)
        scales = torch.stack([self.kv_scales.k_scale, self.kv_scales.v_scale]).view(2, *(1,) * (kv.dim() - 1))
        return dequantize(kv, scales, dtype)

    def _grouped(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One query per sequence: q [b, H, D], k/v [b, L, Hkv, D], mask [b, 1, 1, L] -> [b, H, D]. The query heads
        sharing a KV head are that head's queries, so no KV head is repeated for them (~30% less time than GQA)."""
        (b, num_heads, head_dim), num_kv_heads = q.shape, k.shape[2]
        queries = q.view(b, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [b, Hkv, G, D]
        out = F.scaled_dot_product_attention(queries, k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype),
                                             attn_mask=mask, scale=self.scale)  # [b, Hkv, G, D]
        return out.reshape(b, num_heads, head_dim)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q [B, n, H, D], k/v [B, L, Hkv, D], mask broadcastable to [B, H, n, L] -> [B, n, H, D]."""
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return out.transpose(1, 2)

"""The torch paged attention backend equals plain causal softmax(QK^T)V over each sequence's whole context."""

from __future__ import annotations

import pytest
import torch
from paged_batch import make_metadata

from loomserve.platform.attention import TorchAttentionBackend

BLOCK_SIZE = 16
NUM_BLOCKS = 32
HEAD_DIM = 8

# (context already cached, new tokens) per sequence, decodes (1 new token) first
SCENARIOS = {
    "decode-only": [(14, 1), (15, 1), (16, 1), (31, 1), (0, 1)],
    "prefill-only": [(0, 15), (0, 16), (0, 17), (0, 32)],
    "mixed": [(15, 1), (32, 1), (15, 2), (0, 16), (16, 16), (5, 12)],
}
HEADS = {"gqa-4:1": (8, 2), "mha": (4, 4)}


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [n, H, D] are the last n of the L positions of k/v [L, Hkv, D]; returns [n, H * D]."""
    n, num_heads, _ = q.shape
    length, num_kv_heads, _ = k.shape
    k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)
    v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q, k) * scale  # [H, n, L]
    q_pos = torch.arange(length - n, length)[:, None]
    scores = scores.masked_fill(torch.arange(length)[None, :] > q_pos, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v).flatten(1)


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_paged_attention_equals_dense_causal_attention(scenario: str, heads: str) -> None:
    num_heads, num_kv_heads = HEADS[heads]
    gen = torch.Generator().manual_seed(0)
    seqs = SCENARIOS[scenario]
    lengths = [cached + new for cached, new in seqs]
    # every sequence's K/V over its whole context; blocks drawn in shuffled order
    keys = [torch.randn(n, num_kv_heads, HEAD_DIM, generator=gen) for n in lengths]
    values = [torch.randn(n, num_kv_heads, HEAD_DIM, generator=gen) for n in lengths]
    queries = [torch.randn(new, num_heads, HEAD_DIM, generator=gen) for _, new in seqs]
    free = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    tables = [[free.pop() for _ in range(-(-n // BLOCK_SIZE))] for n in lengths]
    kv_cache = torch.randn(2, NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, HEAD_DIM, generator=gen)
    cached = make_metadata([c for c, _ in seqs], [c for c, _ in seqs], tables, BLOCK_SIZE)
    kv_cache.view(2, -1, num_kv_heads, HEAD_DIM)[:, cached.slot_mapping] = torch.stack(
        [torch.cat([k[:c] for k, (c, _) in zip(keys, seqs, strict=True)]),
         torch.cat([v[:c] for v, (c, _) in zip(values, seqs, strict=True)])]
    )
    meta = make_metadata([new for _, new in seqs], lengths, tables, BLOCK_SIZE)
    assert meta.num_decodes == sum(new == 1 for _, new in seqs)
    scale = HEAD_DIM**-0.5
    backend = TorchAttentionBackend(num_heads, num_kv_heads, HEAD_DIM, scale)
    out = backend.forward(
        torch.cat(queries),
        torch.cat([k[c:] for k, (c, _) in zip(keys, seqs, strict=True)]),
        torch.cat([v[c:] for v, (c, _) in zip(values, seqs, strict=True)]),
        kv_cache,
        meta,
    )
    expected = torch.cat([dense_attention(q, k, v, scale) for q, k, v in zip(queries, keys, values, strict=True)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

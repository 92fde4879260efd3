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


def run_backend(seqs: list[tuple[int, int]], num_heads: int, num_kv_heads: int, stale: float | None):
    """(backend output, dense reference) for sequences of (cached, new) tokens whose blocks are shuffled.
    Cache slots no sequence owns hold random values, or `stale` when given."""
    gen = torch.Generator().manual_seed(0)
    lengths = [cached + new for cached, new in seqs]
    keys = [torch.randn(n, num_kv_heads, HEAD_DIM, generator=gen) for n in lengths]  # whole context
    values = [torch.randn(n, num_kv_heads, HEAD_DIM, generator=gen) for n in lengths]
    queries = [torch.randn(new, num_heads, HEAD_DIM, generator=gen) for _, new in seqs]
    free = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    tables = [[free.pop() for _ in range(-(-n // BLOCK_SIZE))] for n in lengths]
    kv_cache = torch.randn(2, NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, HEAD_DIM, generator=gen)
    if stale is not None:
        kv_cache.fill_(stale)
    cached = make_metadata([c for c, _ in seqs], [c for c, _ in seqs], tables, BLOCK_SIZE)
    kv_cache.view(2, -1, num_kv_heads, HEAD_DIM)[:, cached.slot_mapping] = torch.stack(
        [
            torch.cat([k[:c] for k, (c, _) in zip(keys, seqs, strict=True)]),
            torch.cat([v[:c] for v, (c, _) in zip(values, seqs, strict=True)]),
        ]
    )
    meta = make_metadata([new for _, new in seqs], lengths, tables, BLOCK_SIZE)
    assert meta.num_decodes == sum(new == 1 for _, new in seqs)
    scale = HEAD_DIM**-0.5
    out = TorchAttentionBackend(num_heads, num_kv_heads, HEAD_DIM, scale).forward(
        torch.cat(queries),
        torch.cat([k[c:] for k, (c, _) in zip(keys, seqs, strict=True)]),
        torch.cat([v[c:] for v, (c, _) in zip(values, seqs, strict=True)]),
        kv_cache,
        meta,
    )
    expected = [dense_attention(q, k, v, scale) for q, k, v in zip(queries, keys, values, strict=True)]
    return out, torch.cat(expected)


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_paged_attention_equals_dense_causal_attention(scenario: str, heads: str) -> None:
    out, expected = run_backend(SCENARIOS[scenario], *HEADS[heads], stale=None)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_never_written_cache_slots_do_not_leak_into_the_output() -> None:
    """Uninitialized KV memory may hold NaN: padding past a sequence's end must not reach its output."""
    out, expected = run_backend(SCENARIOS["mixed"], *HEADS["gqa-4:1"], stale=float("nan"))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

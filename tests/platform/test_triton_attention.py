"""The Triton paged attention backend equals the torch reference: mixed batches, block-boundary lengths,
GQA ratios, block sizes, and (on CUDA) bf16/fp16. Without CUDA it runs under Triton's CPU interpreter."""

from __future__ import annotations

import pytest
import torch
from paged_batch import make_metadata

from loomserve.platform.attention import TorchAttentionBackend

pytest.importorskip("triton")  # without CUDA, conftest.py switches Triton to its CPU interpreter
from loomserve.platform.attention.triton_backend import TritonAttentionBackend  # noqa: E402

ON_CUDA = torch.cuda.is_available()

DEVICE = "cuda" if ON_CUDA else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if ON_CUDA else [torch.float32]
HEAD_DIM = 64 if ON_CUDA else 16

# (context already cached, new tokens) per sequence, decodes first
SCENARIOS = {
    "decode-only": [(15, 1), (16, 1), (17, 1), (47, 1), (0, 1)],
    "prefill-only": [(0, 15), (0, 16), (0, 17), (0, 33)],
    "mixed": [(31, 1), (32, 1), (15, 2), (0, 16), (16, 16), (5, 40)],
}
HEADS = {"mha": (4, 4), "gqa-4:1": (8, 2), "gqa-7:1": (14, 2)}


def run_both(seqs, num_heads, num_kv_heads, block_size, dtype):
    gen = torch.Generator().manual_seed(0)
    lengths = [c + n for c, n in seqs]
    num_blocks = sum(-(-n // block_size) for n in lengths) + 3
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in lengths]
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, HEAD_DIM, generator=gen).to(DEVICE, dtype)
    num_new = sum(n for _, n in seqs)
    q = torch.randn(num_new, num_heads, HEAD_DIM, generator=gen).to(DEVICE, dtype)
    k = torch.randn(num_new, num_kv_heads, HEAD_DIM, generator=gen).to(DEVICE, dtype)
    v = torch.randn(num_new, num_kv_heads, HEAD_DIM, generator=gen).to(DEVICE, dtype)
    meta = make_metadata([n for _, n in seqs], lengths, tables, block_size)
    for name in ("slot_mapping", "query_start_loc", "seq_lens", "block_tables"):
        setattr(meta, name, getattr(meta, name).to(DEVICE))
    scale = HEAD_DIM**-0.5
    ref_cache, tri_cache = cache.clone(), cache.clone()
    ref = TorchAttentionBackend(num_heads, num_kv_heads, HEAD_DIM, scale).forward(q, k, v, ref_cache, meta)
    out = TritonAttentionBackend(num_heads, num_kv_heads, HEAD_DIM, scale).forward(q, k, v, tri_cache, meta)
    return out, ref, tri_cache, ref_cache


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_triton_attention_equals_torch_reference(scenario, heads, block_size, dtype):
    out, ref, _, _ = run_both(scenario, *heads, block_size, dtype)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_triton_kv_write_fills_the_same_slots_as_the_reference():
    _, _, tri_cache, ref_cache = run_both(SCENARIOS["mixed"], 8, 2, 16, DTYPES[0])
    assert torch.equal(tri_cache, ref_cache)

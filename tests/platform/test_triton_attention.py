"""The Triton paged attention backend equals the torch reference: mixed batches, block-boundary lengths,
GQA ratios, block sizes, fp8 caches, and (on CUDA) bf16/fp16. Without CUDA it runs under Triton's CPU interpreter."""

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
# Contexts long enough to be cut into KV splits of 64 keys: decodes, a chunk late in its prompt, a whole prompt.
LONG = [(300, 1), (5, 1), (130, 1), (200, 40), (0, 130)]
HEADS = {"mha": (4, 4), "gqa-4:1": (8, 2), "gqa-7:1": (14, 2)}


def run_both(seqs, num_heads, num_kv_heads, block_size, dtype, split_min=512, pad=None, kv_dtype=None,
             kv_scales=(1.0, 1.0), **knobs):
    """The reference's and Triton's outputs (and caches) for one step; `pad` = (tokens, sequences) runs Triton's
    launch as a CUDA graph would, over that many padding tokens and sequences and bounds no step reaches;
    `kv_dtype` (float8) and `kv_scales` make the cache an fp8 one; `knobs` are more TritonAttentionBackend
    settings."""
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
    if kv_dtype is not None:
        cache = cache.to(kv_dtype)
        k, v = on_fp8_grid(k, kv_scales[0], kv_dtype), on_fp8_grid(v, kv_scales[1], kv_dtype)
    meta = make_metadata([n for _, n in seqs], lengths, tables, block_size)
    for name in ("slot_mapping", "query_start_loc", "seq_lens", "block_tables", "seq_counts"):
        setattr(meta, name, getattr(meta, name).to(DEVICE))
    scale = HEAD_DIM**-0.5
    ref_cache, tri_cache = cache.clone(), cache.clone()
    torch_backend = TorchAttentionBackend(num_heads, num_kv_heads, HEAD_DIM, scale).to(DEVICE)
    triton_backend = TritonAttentionBackend(num_heads, num_kv_heads, HEAD_DIM, scale, split_min=split_min,
                                            **knobs).to(DEVICE)
    for backend in (torch_backend, triton_backend):
        backend.kv_scales.set(*kv_scales)
    ref = torch_backend.forward(q, k, v, ref_cache, meta)
    if pad is not None:
        q, k, v, meta = padded_like_a_graph(q, k, v, meta, *pad)
    out = triton_backend.forward(q, k, v, tri_cache, meta)
    return out[: ref.shape[0]], ref, tri_cache, ref_cache


def on_fp8_grid(x: torch.Tensor, scale: float, kv_dtype: torch.dtype) -> torch.Tensor:
    """x moved onto the values an fp8 cache holds exactly (times a power-of-two scale), the first few far beyond
    its range (saturated on write): Triton's CPU interpreter rounds to float8 inexactly (no carry into the exponent,
    ties away from zero), the GPU like torch, so only values needing no rounding are compared everywhere."""
    on_grid = (x.float() / scale).to(kv_dtype).float() * scale
    on_grid[0, 0, :4] = torch.tensor([1e6, -1e6, 1e6, -1e6]) * scale
    return on_grid.to(x.dtype)


def padded_like_a_graph(q, k, v, meta, pad_tokens: int, pad_seqs: int):
    """The step as a CUDA graph's static buffers hold it: random rows after its tokens (slot -1), garbage
    sequences after its sequences, and capture bounds (every sequence may be a decode or a prefill, and as
    long as 2048 tokens) far above what it holds; only `seq_counts` tells the kernels the truth."""
    from loomserve.platform.attention.metadata import LaunchBounds

    t, b = q.shape[0] + pad_tokens, meta.num_seqs + pad_seqs
    extra = lambda x: torch.cat([x, torch.randn(pad_tokens, *x.shape[1:]).to(x)])  # noqa: E731
    junk = torch.full((pad_seqs,), 7, dtype=meta.seq_lens.dtype, device=DEVICE)
    meta.slot_mapping = torch.cat([meta.slot_mapping, torch.full((pad_tokens,), -1, device=DEVICE)])
    meta.query_start_loc = torch.cat([meta.query_start_loc, meta.query_start_loc[-1:] + junk.cumsum(0)])
    meta.seq_lens = torch.cat([meta.seq_lens, junk])
    meta.block_tables = torch.cat([meta.block_tables, meta.block_tables[:1].expand(pad_seqs, -1)])
    meta.capture_bounds = LaunchBounds(decodes=b, prefills=b, prefill_tokens=t, max_seq_len=2048)
    return extra(q), extra(k), extra(v), meta


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_triton_attention_equals_torch_reference(scenario, heads, block_size, dtype):
    out, ref, _, _ = run_both(scenario, *heads, block_size, dtype)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("heads", [(8, 2), (14, 2)], ids=["gqa-4:1", "gqa-7:1"])
def test_triton_attention_split_over_long_contexts_equals_torch_reference(heads):
    out, ref, _, _ = run_both(LONG, *heads, 16, DTYPES[0], split_min=64)
    tol = 1e-4 if DTYPES[0] == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("scenario", [SCENARIOS["decode-only"], SCENARIOS["mixed"], LONG],
                         ids=["decode-only", "mixed", "long"])
def test_triton_attention_in_a_padded_graph_launch_equals_torch_reference(scenario):
    out, ref, tri_cache, ref_cache = run_both(scenario, 8, 2, 16, DTYPES[0], split_min=64, pad=(21, 3))
    tol = 1e-4 if DTYPES[0] == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    assert torch.equal(tri_cache, ref_cache)  # padding tokens wrote nothing


def test_triton_attention_with_prefill_key_blocks_wider_than_the_decodes_equals_torch_reference():
    # Prefill tiles walk keys 128 at a time and decodes 64: both loops (unmasked, then the causal edge) and the
    # combine must cut the same splits.
    out, ref, _, _ = run_both(LONG, 14, 2, 16, DTYPES[0], split_min=128, prefill_block_n=128, prefill_rows=128)
    tol = 1e-4 if DTYPES[0] == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_triton_kv_write_fills_the_same_slots_as_the_reference():
    _, _, tri_cache, ref_cache = run_both(SCENARIOS["mixed"], 8, 2, 16, DTYPES[0])
    assert torch.equal(tri_cache, ref_cache)


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
def test_triton_attention_over_an_fp8_cache_equals_torch_reference(kv_dtype):
    out, ref, tri_cache, ref_cache = run_both(SCENARIOS["mixed"], 8, 2, 16, DTYPES[0], kv_dtype=kv_dtype,
                                              kv_scales=(0.5, 0.25))
    tol = 1e-4 if DTYPES[0] == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    assert torch.equal(tri_cache.view(torch.uint8), ref_cache.view(torch.uint8))  # the same saturated float8 bits


def test_triton_attention_split_over_a_long_fp8_cache_equals_torch_reference():
    # A decode and a chunk late in its prompt, each over several KV splits: the combine of value-scaled parts.
    out, ref, _, _ = run_both([(200, 1), (100, 8)], 8, 2, 16, DTYPES[0], split_min=64, kv_dtype=torch.float8_e4m3fn,
                              kv_scales=(0.25, 2.0))
    tol = 1e-4 if DTYPES[0] == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)

"""The Triton paged-attention backend alone on a mixed step: decodes beside one prefill chunk late in a long
prompt (the step that sets the ITL tail under chunked prefill), per kernel setting.

Builds a random paged KV cache (blocks shuffled), D decodes with contexts uniform in [128, 768] plus one
long-context decode, and one C-token prefill chunk at context L; times `TritonAttentionBackend.forward` (KV
write, attention, split combine) with CUDA events over CUDA-graph replays, and prints a table: microseconds
per call per layer, and the chunk's attention FLOPs over that time (what the tensor cores deliver).
With --graph-bounds the grids are sized as the engine's mixed CUDA graph holding that step sizes them (its
token count padded to the capture ladder, up to --max-num-seqs sequences, --max-model-len keys), which
shows what the programs that find no work cost.

    python -m benchmarks.attention --chunk 256,512 --context 6144
    python -m benchmarks.attention --chunk 0,128 --decodes 8 --graph-bounds
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch

from benchmarks.common import PRESETS, attention_heads
from loomserve.platform.attention.metadata import AttentionMetadata, LaunchBounds
from loomserve.platform.attention.triton_backend import TritonAttentionBackend
from loomserve.platform.cuda_graphs import mixed_capture_sizes


def build_step(decodes: list[int], chunk: int, context: int, heads: tuple[int, int, int], block_size: int,
               device: str, rng: np.random.Generator):
    """Inputs of one step: decodes of the given contexts, then `chunk` new tokens after `context` cached ones."""
    num_heads, num_kv_heads, head_dim = heads
    lengths = [c + 1 for c in decodes] + ([context + chunk] if chunk else [])
    query_lens = [1] * len(decodes) + ([chunk] if chunk else [])
    blocks = [-(-n // block_size) for n in lengths]
    order = rng.permutation(sum(blocks))
    tables, at = [], 0
    for n in blocks:
        tables.append(order[at: at + n].tolist())
        at += n
    width = max(blocks)
    slots = [t[p // block_size] * block_size + p % block_size
             for t, n, q in zip(tables, lengths, query_lens) for p in range(n - q, n)]
    qsl = np.concatenate([[0], np.cumsum(query_lens)]).tolist()
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lengths, dtype=torch.int32, device=device),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device),
        seq_counts=torch.tensor([len(decodes), len(lengths)], device=device),
        num_decodes=len(decodes),
        num_decode_tokens=len(decodes),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=lengths,
    )
    t = qsl[-1]
    cache = torch.randn(2, sum(blocks), block_size, num_kv_heads, head_dim, dtype=torch.bfloat16, device=device)
    q = torch.randn(t, num_heads, head_dim, dtype=torch.bfloat16, device=device)
    k = torch.randn(t, num_kv_heads, head_dim, dtype=torch.bfloat16, device=device)
    v = torch.randn_like(k)
    return q, k, v, cache, meta


def graph_bounds(num_tokens: int, max_num_seqs: int, max_model_len: int) -> LaunchBounds:
    """The launch bounds of the mixed graph the engine replays for a step of `num_tokens` tokens."""
    padded = next(size for size in mixed_capture_sizes(max(512, num_tokens)) if size >= num_tokens)
    seqs = min(padded, max_num_seqs)
    return LaunchBounds(decodes=seqs, prefills=seqs, prefill_tokens=padded, max_seq_len=max_model_len)


def time_us(fn, iters: int = 50) -> float:
    """GPU time per call: `fn` captured once in a CUDA graph (as the engine runs steps of up to
    --max-cudagraph-capture-size tokens) and replayed, so Python's launch cost is not counted."""
    fn()  # compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", choices=sorted(PRESETS), default="qwen2.5-0.5b")
    p.add_argument("--decodes", type=int, default=48)
    p.add_argument("--long-decode", type=int, default=8192, help="context of one more decode (0: none)")
    p.add_argument("--chunk", default="0,128,256,512", help="prefill chunk sizes, comma separated")
    p.add_argument("--context", type=int, default=6144, help="tokens cached before the chunk")
    p.add_argument("--split-min", default="128,256,512", help="TritonAttentionBackend split_min values")
    p.add_argument("--prefill-rows", default="64,128", help="TritonAttentionBackend prefill_rows values")
    p.add_argument("--prefill-block-n", default="64,128", help="TritonAttentionBackend prefill_block_n values")
    p.add_argument("--num-warps", default="4,8", help="TritonAttentionBackend num_warps values")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--graph-bounds", action="store_true", help="size grids as the engine's mixed graphs do")
    p.add_argument("--max-num-seqs", type=int, default=256, help="with --graph-bounds")
    p.add_argument("--max-model-len", type=int, default=32768, help="with --graph-bounds")
    args = p.parse_args()
    heads = attention_heads(args.shape)
    num_heads, num_kv_heads, head_dim = heads
    rng = np.random.default_rng(0)
    decodes = rng.integers(128, 769, args.decodes).tolist() + ([args.long_decode] if args.long_decode else [])
    grids = " (grids as the engine's mixed graphs size them)" if args.graph_bounds else ""
    print(f"{args.shape} heads {num_heads}/{num_kv_heads} dim {head_dim}, {len(decodes)} decodes "
          f"(one at {args.long_decode}), chunk at context {args.context}, bf16, {torch.cuda.get_device_name()}{grids}")
    print("| chunk | split_min | prefill_rows | prefill_block_n | num_warps | us/layer | chunk TFLOP/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    for chunk in ints(args.chunk):
        q, k, v, cache, meta = build_step(decodes, chunk, args.context, heads, args.block_size, "cuda", rng)
        if args.graph_bounds:
            meta.capture_bounds = graph_bounds(q.shape[0], args.max_num_seqs, args.max_model_len)
        flops = 4 * chunk * (args.context + chunk / 2) * head_dim * num_heads or float("nan")  # QK^T, PV; causal
        for setting in itertools.product(ints(args.split_min), ints(args.prefill_rows), ints(args.prefill_block_n),
                                         ints(args.num_warps)):
            knobs = dict(zip(("split_min", "prefill_rows", "prefill_block_n", "num_warps"), setting))
            backend = TritonAttentionBackend(num_heads, num_kv_heads, head_dim, head_dim**-0.5, **knobs).cuda()
            us = time_us(lambda: backend.forward(q, k, v, cache, meta))  # noqa: B023
            print(f"| {chunk} | {' | '.join(map(str, setting))} | {us:.1f} | {flops / us / 1e6:.1f} |")


if __name__ == "__main__":
    main()

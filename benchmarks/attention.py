"""The Triton paged-attention backend alone on a mixed step: decodes beside one prefill chunk late in a long
prompt (the step that sets the ITL tail under chunked prefill), per kernel setting.

Builds a random paged KV cache (blocks shuffled), D decodes with contexts uniform in [128, 768] plus one
long-context decode, and one C-token prefill chunk at context L; times `TritonAttentionBackend.forward` (KV
write, attention, split combine) with CUDA events, eager (not in a graph), and prints a table: microseconds
per call per layer, and the chunk's attention FLOPs over that time (what the tensor cores deliver).

    python -m benchmarks.attention --chunk 256,512 --context 6144
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from loomserve.platform.attention.metadata import AttentionMetadata
from loomserve.platform.attention.triton_backend import TritonAttentionBackend

SHAPES = {"qwen2.5-0.5b": (14, 2, 64), "qwen3-8b": (32, 8, 128)}


def build_step(decodes: list[int], chunk: int, context: int, heads: tuple[int, int, int], block_size: int,
               device: str, rng: np.random.Generator):
    """Inputs of one step: decodes of the given contexts, then `chunk` new tokens after `context` cached ones."""
    num_heads, num_kv_heads, head_dim = heads
    lengths = [c + 1 for c in decodes] + [context + chunk]
    query_lens = [1] * len(decodes) + [chunk]
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


def time_us(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    p.add_argument("--decodes", type=int, default=48)
    p.add_argument("--long-decode", type=int, default=8192, help="context of one more decode (0: none)")
    p.add_argument("--chunk", default="256,512", help="prefill chunk sizes, comma separated")
    p.add_argument("--context", type=int, default=6144, help="tokens cached before the chunk")
    p.add_argument("--split-min", default="512,1024,2048", help="TritonAttentionBackend split_min values")
    p.add_argument("--prefill-rows", default="64,128", help="TritonAttentionBackend prefill_rows values")
    p.add_argument("--block-size", type=int, default=16)
    args = p.parse_args()
    heads = SHAPES[args.shape]
    num_heads, num_kv_heads, head_dim = heads
    rng = np.random.default_rng(0)
    decodes = rng.integers(128, 769, args.decodes).tolist() + ([args.long_decode] if args.long_decode else [])
    print(f"{args.shape} heads {num_heads}/{num_kv_heads} dim {head_dim}, {len(decodes)} decodes "
          f"(one at {args.long_decode}), chunk at context {args.context}, bf16, {torch.cuda.get_device_name()}")
    print("| chunk | split_min | prefill_rows | us/layer | chunk TFLOP/s |\n|---:|---:|---:|---:|---:|")
    for chunk in (int(c) for c in args.chunk.split(",")):
        q, k, v, cache, meta = build_step(decodes, chunk, args.context, heads, args.block_size, "cuda", rng)
        flops = 4 * chunk * (args.context + chunk / 2) * head_dim * num_heads  # QK^T and PV, causal
        for split_min in (int(s) for s in args.split_min.split(",")):
            for rows in (int(r) for r in args.prefill_rows.split(",")):
                backend = TritonAttentionBackend(num_heads, num_kv_heads, head_dim, head_dim**-0.5,
                                                 split_min=split_min, prefill_rows=rows)
                us = time_us(lambda: backend.forward(q, k, v, cache, meta))  # noqa: B023
                print(f"| {chunk} | {split_min} | {rows} | {us:.1f} | {flops / us / 1e6:.1f} |")


if __name__ == "__main__":
    main()

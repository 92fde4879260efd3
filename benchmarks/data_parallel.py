"""Data-parallel routing: cache-aware against round-robin, on a multi-turn workload whose prompts share prefixes.

What it measures
----------------
For each routing in --routings the benchmark starts `loomserve serve --data-parallel-size N --data-parallel-routing
ROUTING` (a `--shape` preset with dummy weights, or `--model PATH`; on one GPU the N engines share the card, so give
each its share: --gpu-memory-utilization 0.4 for two), warms it up, then plays the same conversations:
--num-conversations conversations, each opening with one of --num-system-prompts system prompts of
--system-len tokens (conversation i uses prompt i mod that number), then --turns turns of a --user-len-token user
message and a --output-len-token reply (greedy, EOS ignored). Each turn's prompt is the whole history so far: the
system prompt, the earlier user messages and replies, and the new message. Replies in the history are seeded
random tokens of the reply's length, not the tokens the model produced, so both routings see identical prompts.
All conversations run at once; a conversation's turns run one after another. Token ids are drawn below the
vocabulary (seeded).

Reported per routing: wall time, requests/s, output tokens/s, and the prefix-cache hit rate (prompt tokens found
in the engines' prefix caches over prompt tokens looked up, from the server's /metrics counters, both engines
summed) over the timed run. Cache-aware routing sends a conversation's turns (and the conversations sharing a
system prompt) to the engine that holds their prefix; round robin scatters them.

    python -m benchmarks.data_parallel --shape tiny --device cpu --num-conversations 8 --turns 3 --system-len 128 \\
        --user-len 16 --output-len 8 --kv-cache-memory 64MiB
    python -m benchmarks.data_parallel --shape qwen2.5-0.5b --device cuda --gpu-memory-utilization 0.4 \\
        --num-conversations 128 --turns 4 --system-len 1024 --user-len 64 --output-len 128
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import add_model_flags, command_line, environment, prompt_vocab_size, resolve_model
from loomserve.platform.config import resolve_device
from loomserve.platform.dp_router import ROUTINGS
from loomserve.testing.server import MODEL, Server


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_model_flags(p, "server --load-format")
    p.add_argument("--routings", default=",".join(ROUTINGS), help="comma list of: " + ", ".join(ROUTINGS))
    p.add_argument("--data-parallel-size", type=int, default=2)
    p.add_argument("--num-conversations", type=int, default=64)
    p.add_argument("--num-system-prompts", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system-len", type=int, default=1024)
    p.add_argument("--user-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="server --device: auto, cpu, cuda")
    p.add_argument("--kv-cache-memory", default=None, help="each engine's KV cache, e.g. 2GiB")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, help="each engine's share of the GPU")
    p.add_argument("--server-args", default="", help="more `loomserve serve` flags, one shell-quoted string")
    p.add_argument("--server-timeout", type=float, default=900.0, help="seconds to wait for /health")
    args = p.parse_args(argv)
    args.routings = [r for r in args.routings.split(",") if r]
    unknown = set(args.routings) - set(ROUTINGS)
    if unknown:
        p.error(f"unknown routings {sorted(unknown)}; choose from {', '.join(ROUTINGS)}")
    return args


@dataclass
class Conversation:
    system: list[int]
    turns: list[tuple[list[int], list[int]]]  # (user message, the reply placed in the history)

    def prompt(self, turn: int) -> list[int]:
        """The history before turn `turn`'s reply: system prompt, earlier messages and replies, its message."""
        history = list(self.system)
        for user, reply in self.turns[:turn]:
            history += user + reply
        return history + self.turns[turn][0]


def sample_conversations(args: argparse.Namespace, vocab: int) -> list[Conversation]:
    rng = np.random.default_rng(args.seed)
    systems = [rng.integers(0, vocab, size=args.system_len).tolist() for _ in range(args.num_system_prompts)]
    return [
        Conversation(systems[i % len(systems)],
                     [(rng.integers(0, vocab, size=args.user_len).tolist(),
                       rng.integers(0, vocab, size=args.output_len).tolist()) for _ in range(args.turns)])
        for i in range(args.num_conversations)
    ]


async def converse(client: httpx.AsyncClient, conversation: Conversation, output_len: int) -> int:
    """Play a conversation's turns one after another; returns the output tokens produced."""
    produced = 0
    for turn in range(len(conversation.turns)):
        body = {"model": MODEL, "prompt": conversation.prompt(turn), "max_tokens": output_len, "temperature": 0.0,
                "ignore_eos": True}
        reply = await client.post("/v1/completions", json=body)
        reply.raise_for_status()
        produced += reply.json()["usage"]["completion_tokens"]
    return produced


async def play(url: str, conversations: list[Conversation], output_len: int) -> tuple[float, int]:
    limits = httpx.Limits(max_connections=len(conversations))
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits, trust_env=False) as client:
        start = time.perf_counter()
        produced = await asyncio.gather(*(converse(client, c, output_len) for c in conversations))
        return time.perf_counter() - start, sum(produced)


@dataclass
class RoutingResult:
    routing: str
    wall_s: float
    requests: int
    output_tokens: int
    hits: float
    queries: float

    def row(self) -> list[str]:
        rate = self.hits / self.queries if self.queries else float("nan")
        return [self.routing, f"{self.wall_s:.2f}", f"{self.requests / self.wall_s:.2f}",
                f"{self.output_tokens / self.wall_s:,.1f}", f"{rate:.1%}", f"{self.hits:,.0f} / {self.queries:,.0f}"]


def server_flags(args: argparse.Namespace, load_format: str, routing: str) -> list[str]:
    flags = ["--served-model-name", MODEL, "--load-format", load_format, "--device", args.device,
             "--data-parallel-size", str(args.data_parallel_size), "--data-parallel-routing", routing,
             "--uvicorn-log-level", "warning"]
    for flag, value in (("--kv-cache-memory", args.kv_cache_memory),
                        ("--gpu-memory-utilization", args.gpu_memory_utilization)):
        if value is not None:
            flags += [flag, str(value)]
    return flags + shlex.split(args.server_args)


def bench_routing(args: argparse.Namespace, model_path: Path, load_format: str, routing: str,
                  conversations: list[Conversation], warmup: list[Conversation], log_dir: Path) -> RoutingResult:
    server = Server(str(model_path), server_flags(args, load_format, routing), log_dir / f"server-{routing}.log")
    print(f"\n## {routing}: {shlex.join(server.command[1:])}", flush=True)
    with server.running(args.server_timeout) as startup_s:
        print(f"    healthy after {startup_s:.1f} s", flush=True)
        asyncio.run(play(server.url, warmup, 4))
        hits, queries = (server.metric(f"loomserve:prefix_cache_{k}_total") for k in ("hits", "queries"))
        wall, produced = asyncio.run(play(server.url, conversations, args.output_len))
        hits = server.metric("loomserve:prefix_cache_hits_total") - hits
        queries = server.metric("loomserve:prefix_cache_queries_total") - queries
    return RoutingResult(routing, wall, len(conversations) * args.turns, produced, hits, queries)


def format_table(results: list[RoutingResult]) -> str:
    header = ["routing", "wall s", "req/s", "output tok/s", "prefix hit rate", "hit / looked-up tokens"]
    rows = [r.row() for r in results]
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_path, load_format = resolve_model(args)
    vocab = prompt_vocab_size(model_path)
    conversations = sample_conversations(args, vocab)
    warmup = sample_conversations(argparse.Namespace(**{**vars(args), "seed": args.seed + 1, "turns": 1,
                                                         "num_conversations": 4}), vocab)
    description = {
        "model": f"{args.model} ({load_format})" if args.model else f"--shape {args.shape} (dummy weights)",
        "engines": f"{args.data_parallel_size} data-parallel replicas",
        "workload": (f"{args.num_conversations} conversations x {args.turns} turns over {args.num_system_prompts} "
                     f"system prompts of {args.system_len} tokens; {args.user_len}-token messages, "
                     f"{args.output_len}-token replies (greedy, EOS ignored)"),
        "command": command_line(argv),
    }
    for key, value in {**environment(resolve_device(args.device)), **description}.items():
        print(f"{key:>20}: {value}")
    log_dir = Path(tempfile.mkdtemp(prefix="loomserve-dp-bench-"))
    results = [bench_routing(args, model_path, load_format, routing, conversations, warmup, log_dir)
               for routing in args.routings]
    print()
    print(format_table(results))
    print(f"\nserver logs in {log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

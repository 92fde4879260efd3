"""KV beyond the device's pool: the CPU tier of the prefix cache, and disaggregated prefill/decode.

`offload` (what the CPU tier buys)
----------------------------------
A multi-turn chat workload on the engine in this process (`EngineCore`, no HTTP): --num-conversations
conversations, each a distinct system prompt of --system-len random token ids, then --turns turns; a turn's prompt
is the conversation so far (system prompt, earlier user messages and the engine's own answers) plus a new user
message of --user-len tokens, answered with --answer-len greedy tokens (EOS ignored). Turns go round the
conversations (every conversation's turn 1, then every turn 2, ...), --concurrency requests at a time, so by the
time a conversation comes back the others have pushed its prefix out of the device pool whenever their contexts
together exceed it: the table reports that working set (the contexts at the end) as a multiple of the device pool.
The same workload runs twice on the same device pool (--kv-cache-memory): without a CPU tier, then with
--kv-offloading-size GiB. Before each timed run a short warm-up of other conversations runs and the prefix cache
is reset. Reported per run: prefix hit rate (prompt tokens found cached over prompt tokens looked up; hits from
the CPU tier count once loaded), tokens loaded from the CPU tier, TTFT (submission to the first token, queueing
included) median and p90, the TTFT median of tier hits (part of the prefix loaded from the CPU tier), device hits
(part of it found in the device pool only) and misses separately, wall time; then TTFT median without / with, and
of the misses without the tier over the tier hits with it.

`host-memory` (what the CPU tier costs start-up)
------------------------------------------------
--kv-offloading-size GiB of host blocks allocated as the tier allocates them (pinned on CUDA): the time start-up
waits (the first chunk) and the time until the background thread (started as the first copy starts it) has
allocated every chunk; with --whole, one
allocation of the whole tier for comparison.

`pd` (disaggregated prefill/decode on one device)
-------------------------------------------------
`benchmarks/serving.py`'s workload and client (take its flags: --long-prompt-mix, --request-rates, ...) against one
colocated server, then against a prefill server (kv_producer) and a decode server (kv_consumer) sharing the
device, each with --pd-gpu-memory-utilization, behind `loomserve proxy`; the KV travels by --kv-connector
(TcpConnector, or SharedMemoryConnector through /dev/shm). Reported: serving.py's table for each
(TTFT, ITL median / p99 and their ratio).

    python -m benchmarks.kv_offload offload --shape tiny --device cpu
    python -m benchmarks.kv_offload host-memory --device cpu --kv-offloading-size 8 --whole
    python -m benchmarks.kv_offload pd --shape tiny --device cpu --request-rates 2 --num-requests 16 \
        --long-prompt-mix
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks import serving
from benchmarks.common import add_model_flags, command_line, environment, percentile, prompt_vocab_size, resolve_model
from loomserve.platform.config import EngineArgs, resolve_device
from loomserve.platform.config.kv_transfer import SHARED_MEMORY, TCP
from loomserve.platform.engine import EngineCore
from loomserve.platform.kv_transfer.host_memory import HostBlocks
from loomserve.platform.messages import EngineCoreRequest
from loomserve.platform.request import SamplingParams
from loomserve.testing.server import Server

# ------------------------------------------------------------------------------------------------ offload


def parse_offload_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kv_offload offload", description="multi-turn chat with and without a CPU tier")
    add_model_flags(p, "engine load_format")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--kv-cache-memory", default=None, help="device KV pool (default: 1GiB on CUDA, 2MiB on CPU)")
    p.add_argument("--kv-offloading-size", type=float, default=None, help="GiB (default: 16 on CUDA, 0.05 on CPU)")
    p.add_argument("--max-model-len", type=int, default=None, help="default: the longest conversation's length")
    p.add_argument("--num-conversations", type=int, default=None, help="default: 128 on CUDA, 24 on CPU")
    p.add_argument("--turns", type=int, default=None, help="default: 4 on CUDA, 3 on CPU")
    p.add_argument("--system-len", type=int, default=None, help="default: 2048 on CUDA, 128 on CPU")
    p.add_argument("--user-len", type=int, default=None, help="default: 256 on CUDA, 16 on CPU")
    p.add_argument("--answer-len", type=int, default=None, help="default: 128 on CUDA, 8 on CPU")
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight (default: 8 on CUDA, 4 on CPU)")
    p.add_argument("--warmup-conversations", type=int, default=4)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cuda = resolve_device(args.device).type == "cuda"
    defaults = {  # CUDA: Qwen2.5-0.5B's 12 KiB per token, a 1 GiB pool of ~87k tokens, a working set of ~5x
        "kv_cache_memory": "1GiB" if cuda else "2MiB", "kv_offloading_size": 16.0 if cuda else 0.05,
        "num_conversations": 128 if cuda else 24, "turns": 4 if cuda else 3,
        "system_len": 2048 if cuda else 128, "user_len": 256 if cuda else 16, "answer_len": 128 if cuda else 8,
        "concurrency": 8 if cuda else 4,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.max_model_len is None:  # no longer than needed: an 8B shape's 1 GiB pool holds only ~7k tokens
        args.max_model_len = args.system_len + args.turns * (args.user_len + args.answer_len)
    return args


@dataclass
class Conversation:
    system: list[int]
    user_turns: list[list[int]]
    history: list[int] = field(default_factory=list)  # everything said so far

    def prompt(self, turn: int) -> list[int]:
        return (self.history or self.system) + self.user_turns[turn]


def make_conversations(args: argparse.Namespace, vocab: int, num: int, variant: int) -> list[Conversation]:
    rng = np.random.default_rng([args.seed, variant])
    return [Conversation(rng.integers(0, vocab, args.system_len).tolist(),
                         [rng.integers(0, vocab, args.user_len).tolist() for _ in range(args.turns)])
            for _ in range(num)]


HIT_KINDS = ("tier hits", "device hits", "misses")


@dataclass
class ChatRun:
    name: str
    ttfts: dict[str, list[float]]  # hit kind -> TTFTs of the requests of that kind
    queries: int
    hits: int
    loaded_tokens: int
    wall_s: float
    working_set_tokens: int
    pool_tokens: int

    def all_ttfts(self) -> list[float]:
        return [t for kind in HIT_KINDS for t in self.ttfts[kind]]

    def row(self) -> list[str]:
        ttfts = self.all_ttfts()
        by_kind = [f"{1e3 * percentile(self.ttfts[k], 50):.1f} ({len(self.ttfts[k])})" for k in HIT_KINDS]
        return [self.name, str(len(ttfts)), f"{self.working_set_tokens / self.pool_tokens:.1f}x",
                f"{self.hits / max(self.queries, 1):.1%}", f"{self.loaded_tokens:,}",
                f"{1e3 * percentile(ttfts, 50):.1f}", f"{1e3 * percentile(ttfts, 90):.1f}", *by_kind,
                f"{self.wall_s:.1f}"]


CHAT_HEADER = ["run", "requests", "working set / pool", "prefix hit rate", "tokens from CPU tier", "TTFT med ms",
               "TTFT p90 ms", *(f"TTFT med ms, {k} (n)" for k in HIT_KINDS), "wall s"]


def chat(
    engine: EngineCore, conversations: list[Conversation], args: argparse.Namespace
) -> tuple[dict[str, list[float]], int, int]:
    """Run every turn of `conversations`; (TTFTs by hit kind, prompt tokens looked up, found cached). A request is a
    tier hit when the CPU tier loaded part of its prefix, a device hit when only the device pool had some of it."""
    params = SamplingParams(temperature=0.0, max_tokens=args.answer_len, ignore_eos=True)
    order = deque((turn, c) for turn in range(args.turns) for c in range(len(conversations)))
    running: dict[str, tuple[int, list[int], float]] = {}  # request id -> conversation, prompt, submitted at
    answers: dict[str, list[int]] = {}
    tier = engine.scheduler.hook("kv_offload")
    tier_hits: set[str] = set()
    ttfts: dict[str, list[float]] = {kind: [] for kind in HIT_KINDS}
    queries = hits = 0
    while order or running:
        while order and len(running) < args.concurrency:
            turn, c = order[0]
            if any(conv == c for conv, _, _ in running.values()):
                break  # its previous turn is still being answered
            order.popleft()
            request_id, prompt = f"{c}-{turn}", conversations[c].prompt(turn)
            engine.add_request(EngineCoreRequest(request_id, prompt, params, None, time.perf_counter()))
            running[request_id] = (c, prompt, time.perf_counter())
            answers[request_id] = []
        outputs = engine.step()
        now = time.perf_counter()
        if tier is not None:
            tier_hits.update(tier.loads)  # what the step just scheduled loaded
        if outputs.scheduler_stats is not None:
            queries += outputs.scheduler_stats.prefix_cache_queries
            hits += outputs.scheduler_stats.prefix_cache_hits
        for out in outputs.outputs:
            c, prompt, submitted = running[out.request_id]
            if not answers[out.request_id] and out.new_token_ids:
                ttfts[_hit_kind(out.request_id in tier_hits, out.num_cached_tokens)].append(now - submitted)
            answers[out.request_id] += out.new_token_ids
            if out.finish_reason is not None:
                conversations[c].history = prompt + answers.pop(out.request_id)
                tier_hits.discard(out.request_id)
                del running[out.request_id]
    return ttfts, queries, hits


def _hit_kind(loaded: bool, num_cached_tokens: int) -> str:
    return "tier hits" if loaded else "device hits" if num_cached_tokens else "misses"


def run_offload(args: argparse.Namespace) -> None:
    model_path, load_format = resolve_model(args)
    vocab = prompt_vocab_size(model_path)
    print_block({**environment(resolve_device(args.device)), "command": command_line(),
                 "workload": f"{args.num_conversations} conversations x {args.turns} turns; system {args.system_len}, "
                             f"user {args.user_len}, answer {args.answer_len} tokens; {args.concurrency} in flight"})
    runs = []
    for name, offload in (("device pool only", None), (f"+ CPU tier {args.kv_offloading_size:g} GiB",
                                                      args.kv_offloading_size)):
        engine_args = EngineArgs(model=str(model_path), load_format=load_format, device=args.device, dtype=args.dtype,
                                 kv_cache_memory=args.kv_cache_memory, max_model_len=args.max_model_len,
                                 enforce_eager=args.enforce_eager, kv_offloading_size=offload)
        engine = EngineCore(engine_args.create_engine_config())
        try:
            chat(engine, make_conversations(args, vocab, args.warmup_conversations, 1 << 20), args)
            engine.reset_prefix_cache()
            conversations = make_conversations(args, vocab, args.num_conversations, 0)
            t0 = time.perf_counter()
            ttfts, queries, hits = chat(engine, conversations, args)
            wall = time.perf_counter() - t0
            tier = engine.scheduler.hook("kv_offload")
            pool_tokens = engine.scheduler.kv.pool.num_blocks * engine.config.cache_config.block_size
            runs.append(ChatRun(name, ttfts, queries, hits, tier.loaded_tokens if tier else 0, wall,
                                sum(len(c.history) for c in conversations), pool_tokens))
        finally:
            engine.shutdown()
    print()
    print_table(CHAT_HEADER, [r.row() for r in runs])
    base, tiered = (percentile(r.all_ttfts(), 50) for r in runs)
    print(f"\nTTFT median without / with the CPU tier: {base / tiered:.2f}x", flush=True)
    misses, tier_hits = percentile(runs[0].ttfts["misses"], 50), percentile(runs[1].ttfts["tier hits"], 50)
    print(f"TTFT median of misses without the tier / of tier hits with it: {misses / tier_hits:.2f}x", flush=True)


# -------------------------------------------------------------------------------------------- host-memory


def parse_host_memory_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kv_offload host-memory", description="start-up cost of the CPU tier's memory")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--kv-offloading-size", type=float, default=8.0, help="GiB")
    p.add_argument("--whole", action="store_true", help="also time one allocation of the whole tier")
    return p.parse_args(argv)


def run_host_memory(args: argparse.Namespace) -> None:
    """How long the CPU tier holds up start-up (its first chunk), and how long until the background thread has
    allocated (pinned, on CUDA) all of it; with --whole, one allocation of the whole tier for comparison."""
    device = resolve_device(args.device)
    block_shape, dtype = (24, 2, 16, 2, 64), torch.bfloat16  # a Qwen2.5-0.5B block of 16 tokens, 192 KiB
    num_blocks = int(args.kv_offloading_size * 2**30) // (math.prod(block_shape) * dtype.itemsize)
    print_block({**environment(device), "command": command_line()})
    t0 = time.perf_counter()
    host = HostBlocks(num_blocks, block_shape, dtype, device)
    startup = time.perf_counter() - t0
    host.chunk(len(host.chunks) - 1)  # starts the background thread (as the first copy does) and waits for the last
    rows = [["chunked (first chunk at start-up)", f"{1e3 * startup:.1f}", f"{1e3 * (time.perf_counter() - t0):.1f}",
             str(len(host.chunks))]]
    del host
    if args.whole:
        t0 = time.perf_counter()
        whole = torch.empty((num_blocks, *block_shape), dtype=dtype, pin_memory=device.type == "cuda")
        elapsed = f"{1e3 * (time.perf_counter() - t0):.1f}"
        rows.append(["whole tier at once", elapsed, elapsed, "1"])
        del whole
    print()
    print_table(["allocation", "start-up ms", "all allocated ms", "chunks"], rows)


# ----------------------------------------------------------------------------------------------------- pd


def parse_pd_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kv_offload pd", add_help=False)
    p.add_argument("--pd-gpu-memory-utilization", type=float, default=0.4,
                   help="share of the device each of the prefill and decode servers may use")
    p.add_argument("--kv-connector", default=TCP, choices=[TCP, SHARED_MEMORY], help="how the KV travels")
    own, rest = p.parse_known_args(argv)
    args = serving.parse_args(rest)
    args.pd_gpu_memory_utilization = own.pd_gpu_memory_utilization
    args.kv_connector = own.kv_connector
    return args


def kv_transfer_config(connector: str, role: str) -> str:
    return json.dumps({"kv_connector": connector, "kv_role": role})


def run_pd(args: argparse.Namespace) -> None:
    """The same workload on one colocated server, then on a prefill and a decode server behind the proxy; both
    runs draw the same token ids."""
    model_path, load_format = resolve_model(args)
    vocab = prompt_vocab_size(model_path)
    print_block({**environment(resolve_device(args.device)), **serving.describe_workload(args)})
    log_dir = Path(args.server_log_dir or tempfile.mkdtemp(prefix="loomserve-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    flags = serving.server_flags(args, load_format, (args.max_num_batched_tokens or [None])[0])
    share = ["--gpu-memory-utilization", str(args.pd_gpu_memory_utilization)]
    colocated = Server(str(model_path), flags, log_dir / "colocated.log")
    prefill, decode = (
        Server(str(model_path), [*flags, *share, "--kv-transfer-config", config], log_dir / f"{name}.log")
        for name, config in (("prefill", kv_transfer_config(args.kv_connector, "kv_producer")),
                             ("decode", kv_transfer_config(args.kv_connector, "kv_consumer")))
    )
    proxy = Server(None, ["--prefill", prefill.url, "--decode", decode.url, "--uvicorn-log-level", "warning"],
                   log_dir / "proxy.log", subcommand="proxy")
    print("\n## colocated: one server", flush=True)
    print(f"    {shlex.join(colocated.command[1:])}", flush=True)
    with colocated.running(args.server_timeout):
        serving.bench_url(colocated.url, args, vocab, 0)
    print("\n## disaggregated: prefill and decode servers on one device, behind loomserve proxy", flush=True)
    for server in (prefill, decode):
        print(f"    {shlex.join(server.command[1:])}", flush=True)
    try:
        for server in (prefill, decode, proxy):
            server.start(args.server_timeout)
        serving.bench_url(proxy.url, args, vocab, 0)
    finally:
        for server in (proxy, decode, prefill):
            server.stop()
    print(f"\nserver logs in {log_dir}", flush=True)


# ---------------------------------------------------------------------------------------------- reports


def print_block(items: dict[str, str]) -> None:
    for key, value in items.items():
        print(f"{key:>18}: {value}", flush=True)


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    modes = {"offload": (run_offload, parse_offload_args), "host-memory": (run_host_memory, parse_host_memory_args),
             "pd": (run_pd, parse_pd_args)}
    if not argv or argv[0] not in modes:
        print(__doc__)
        print(f"usage: python -m benchmarks.kv_offload {{{','.join(modes)}}} [flags]", file=sys.stderr)
        return 2
    run, parse = modes[argv[0]]
    run(parse(argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

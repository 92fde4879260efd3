"""The API server's own CPU cost per streamed chunk: what caps one API process's streaming rate.

Starts `loomserve serve` on a preset (dummy weights), then per workload sends --concurrency streaming requests at
once (exactly --output-len tokens each, EOS ignored, `stream_options.include_usage`), counts the SSE chunks that
carry a choice, and reads the API-server process's CPU time (user + system, from /proc; the engine runs in its
own process and is not counted) before and after, and the client's own (this process's: httpx reading the
streams). Workloads cover both generation routes, n = 1 and n > 1, stop strings and logprobs. Prints one row per
workload and repeat: chunks, API CPU seconds, API CPU µs per chunk and per request, client CPU µs per chunk, wall
seconds.

`--profile FILE` runs the server's event-loop thread under cProfile instead (a separate, untimed server: cProfile
itself costs more than the code it measures), writes the stats to FILE and prints the top functions.

    python -m benchmarks.frontend_cpu --shape tiny --concurrency 32 --output-len 256 --repeats 3
    python -m benchmarks.frontend_cpu --workloads completions,chat --profile /tmp/frontend.prof
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.common import PRESETS, build_preset_checkpoint, markdown_table, print_run_header, prompt_vocab_size
from loomserve.testing.server import Server

_NEVER = ["<never-stop>", "\u0394\u0394\u0394"]  # stop strings random weights do not write: held-back tails only


@dataclass(frozen=True)
class Workload:
    """One kind of streamed request: its route and what its body adds to the plain one."""

    route: str  # "completions" or "chat"
    extra: dict[str, Any] = field(default_factory=dict)


WORKLOADS: dict[str, Workload] = {
    "completions": Workload("completions"),
    "completions-stop": Workload("completions", {"stop": _NEVER}),
    "completions-logprobs": Workload("completions", {"logprobs": 2}),
    "completions-n4": Workload("completions", {"n": 4}),
    "chat": Workload("chat"),
    "chat-stop-logprobs": Workload("chat", {"stop": _NEVER, "logprobs": True, "top_logprobs": 2}),
    "chat-n2": Workload("chat", {"n": 2}),
}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def request_body(workload: Workload, prompt: list[int], text: str, output_len: int) -> dict[str, Any]:
    body = {"max_tokens": output_len, "ignore_eos": True, "stream": True, "temperature": 0.0,
            "stream_options": {"include_usage": True}, **workload.extra}
    if workload.route == "chat":
        return {"messages": [{"role": "user", "content": text}], **body}
    return {"prompt": prompt, **body}


async def stream_one(client: httpx.AsyncClient, workload: Workload, body: dict[str, Any]) -> int:
    """Chunks that carried a choice for one streamed request."""
    path = "/v1/chat/completions" if workload.route == "chat" else "/v1/completions"
    chunks = 0
    async with client.stream("POST", path, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                chunks += 1
    return chunks


async def load(base_url: str, workload: Workload, bodies: list[dict[str, Any]]) -> int:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits, trust_env=False) as client:
        return sum(await asyncio.gather(*(stream_one(client, workload, b) for b in bodies)))


class Prompts:
    """Random prompts: token ids for completions, words for chat."""

    def __init__(self, vocab: int, length: int, count: int) -> None:
        self.rng = np.random.default_rng(0)
        self.vocab, self.length, self.count = vocab, length, count

    def bodies(self, workload: Workload, output_len: int) -> list[dict[str, Any]]:
        ids = [self.rng.integers(0, self.vocab, self.length).tolist() for _ in range(self.count)]
        texts = [" ".join(f"w{t % 997}" for t in p) for p in ids]
        return [request_body(workload, p, t, output_len) for p, t in zip(ids, texts, strict=True)]


class ProfiledServer(Server):
    """The server with its main thread (uvicorn's event loop: the whole front end) under cProfile."""

    profile_path: str = ""

    @property
    def command(self) -> list[str]:
        code = ("import sys; from benchmarks.frontend_cpu import profiled_cli; "
                f"profiled_cli({self.profile_path!r}, sys.argv[1:])")
        return [sys.executable, "-c", code, *super().command[3:]]


def profiled_cli(path: str, argv: list[str]) -> None:
    """`loomserve <argv>` under cProfile; the stats go to `path` once it stops (SIGINT: a graceful stop)."""
    from loomserve.api.cli import main as cli_main

    profile = cProfile.Profile(time.thread_time)  # the event loop's own CPU, not the wall under a busy host
    profile.enable()
    try:
        cli_main(argv)
    finally:
        profile.disable()
        profile.dump_stats(path)


def run_workloads(server: Server, prompts: Prompts, names: list[str], output_len: int, repeats: int) -> None:
    header = ["workload", "repeat", "requests", "chunks", "API CPU s", "API us/chunk", "API us/request",
              "client us/chunk", "wall s"]
    rows = []
    for name in names:
        workload = WORKLOADS[name]
        asyncio.run(load(server.url, workload, prompts.bodies(workload, 8)))  # warm-up
        for i in range(repeats):
            bodies = prompts.bodies(workload, output_len)
            cpu0, own0, t0 = cpu_seconds(server.process.pid), cpu_seconds(os.getpid()), time.perf_counter()
            chunks = asyncio.run(load(server.url, workload, bodies))
            cpu, wall = cpu_seconds(server.process.pid) - cpu0, time.perf_counter() - t0
            own = cpu_seconds(os.getpid()) - own0
            rows.append([name, str(i + 1), str(len(bodies)), str(chunks), f"{cpu:.2f}", f"{cpu / chunks * 1e6:.0f}",
                         f"{cpu / len(bodies) * 1e6:.0f}", f"{own / chunks * 1e6:.0f}", f"{wall:.2f}"])
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(markdown_table(header, rows))


def detokenizer_costs(path: Path, batch: int, tokens: int) -> None:
    """What detokenizing costs where it runs now (this process, one token per request per step) against what moving
    it would cost: the engine's outputs of one step for `batch` requests on the wire, as token ids and with text."""
    from transformers import AutoTokenizer

    from loomserve.platform import wire
    from loomserve.platform.detokenizer import IncrementalDetokenizer
    from loomserve.platform.messages import EngineCoreOutput, EngineCoreOutputs

    tokenizer = AutoTokenizer.from_pretrained(path)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, prompt_vocab_size(path), (batch, tokens)).tolist()
    detoks = [IncrementalDetokenizer(tokenizer) for _ in range(batch)]
    t0 = time.process_time()
    texts = [[d.update([t], False) for t in row] for d, row in zip(detoks, ids, strict=True)]
    detok_us = (time.process_time() - t0) / (batch * tokens) * 1e6
    step = EngineCoreOutputs([EngineCoreOutput(f"req-{i}", [row[0]]) for i, row in enumerate(ids)])
    plain = [[f"req-{i}", [row[0]]] for i, row in enumerate(ids)]
    with_text = [[f"req-{i}", [row[0]], texts[i][0]] for i, row in enumerate(ids)]
    rows = []
    for name, message, kind in (("EngineCoreOutputs (as sent now)", step, EngineCoreOutputs),
                                ("[id, token ids] lists", plain, Any), ("[id, token ids, text] lists", with_text, Any)):
        t0 = time.process_time()
        for _ in range(200):
            wire.decode(wire.encode(message), kind)
        rows.append([name, f"{(time.process_time() - t0) / (200 * batch) * 1e6:.2f}"])
    print(f"# incremental detokenization here: {detok_us:.2f} us per token ({batch} streams x {tokens} tokens)")
    print(markdown_table(["one step's outputs on the wire", "encode + decode us per request"], rows))


def print_profile(path: str, top: int) -> None:
    stats = pstats.Stats(path)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumtime").print_stats(r"loomserve|starlette|uvicorn", top)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {', '.join(WORKLOADS)}")
    p.add_argument("--profile", metavar="FILE", help="profile the server's event loop (cProfile) instead of timing")
    p.add_argument("--profile-top", type=int, default=40)
    p.add_argument("--detokenizer", action="store_true",
                   help="only measure detokenization and the wire in this process (no server)")
    args = p.parse_args()
    names = args.workloads.split(",")
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        p.error(f"unknown workloads {unknown}")
    path = build_preset_checkpoint(args.shape)
    if args.detokenizer:
        detokenizer_costs(path, args.concurrency, args.output_len)
        return
    prompts = Prompts(prompt_vocab_size(path), args.prompt_len, args.concurrency)
    flags = ["--load-format", "dummy", "--device", args.device, "--uvicorn-log-level", "warning"]
    import torch

    print_run_header(None, torch.device(args.device))
    print(f"# {args.shape} on {args.device}: {args.concurrency} concurrent streams of {args.output_len} tokens")
    with tempfile.TemporaryDirectory() as logs:
        server = Server(str(path), flags, Path(logs) / "server.log")
        if args.profile:
            server = ProfiledServer(str(path), flags, Path(logs) / "server.log")
            server.profile_path = os.path.abspath(args.profile)
        with server.running(timeout=600):
            run_workloads(server, prompts, names, args.output_len, 1 if args.profile else args.repeats)
    if args.profile:
        print_profile(args.profile, args.profile_top)


if __name__ == "__main__":
    main()

"""The API server's own CPU cost per streamed token: what caps one API process's streaming rate.

Starts `loomserve serve` on a preset (dummy weights), sends --concurrency streaming `/v1/completions` at once
(random prompt token ids, exactly --output-len tokens each, EOS ignored), counts the SSE chunks that carry a
token, and reads the API-server process's CPU time (user + system, from /proc; the engine runs in its own
process and is not counted) before and after, and the client's own (this process's: httpx reading the
streams, what a benchmark's measured ITL also waits on). Prints one row per repeat: chunks, API CPU seconds,
API and client CPU microseconds per chunk, wall seconds.

    python -m benchmarks.frontend_cpu --shape tiny --concurrency 32 --output-len 256 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import PRESETS, build_preset_checkpoint, prompt_vocab_size
from loomserve.testing.server import Server


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def stream_one(client: httpx.AsyncClient, prompt: list[int], output_len: int) -> int:
    """Chunks that carried text for one streamed completion."""
    body = {"prompt": prompt, "max_tokens": output_len, "ignore_eos": True, "stream": True, "temperature": 0.0}
    chunks = 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                chunks += 1
    return chunks


async def load(base_url: str, prompts: list[list[int]], output_len: int) -> int:
    limits = httpx.Limits(max_connections=len(prompts))
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits, trust_env=False) as client:
        return sum(await asyncio.gather(*(stream_one(client, p, output_len) for p in prompts)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    path = build_preset_checkpoint(args.shape)
    rng = np.random.default_rng(0)
    vocab = prompt_vocab_size(path)
    flags = ["--load-format", "dummy", "--device", args.device, "--uvicorn-log-level", "warning"]
    with tempfile.TemporaryDirectory() as logs:
        server = Server(str(path), flags, Path(logs) / "server.log")
        with server.running(timeout=600):
            prompts = lambda: [rng.integers(0, vocab, args.prompt_len).tolist() for _ in range(args.concurrency)]  # noqa: E731
            asyncio.run(load(server.url, prompts(), 8))  # warm-up
            print(f"{args.shape} on {args.device}: {args.concurrency} concurrent streams of {args.output_len} tokens")
            print("| repeat | chunks | API CPU s | API CPU us/chunk | client CPU us/chunk | wall s |\n"
                  "|---:|---:|---:|---:|---:|---:|")
            for i in range(args.repeats):
                cpu0, own0, t0 = cpu_seconds(server.process.pid), cpu_seconds(os.getpid()), time.perf_counter()
                chunks = asyncio.run(load(server.url, prompts(), args.output_len))
                cpu, wall = cpu_seconds(server.process.pid) - cpu0, time.perf_counter() - t0
                own = cpu_seconds(os.getpid()) - own0
                print(f"| {i + 1} | {chunks} | {cpu:.2f} | {cpu / chunks * 1e6:.0f} | {own / chunks * 1e6:.0f} | "
                      f"{wall:.2f} |")


if __name__ == "__main__":
    main()

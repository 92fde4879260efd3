"""The hardening probe (issues 19 and 25): hostile and oversized requests against a live server, each timed, with
/health asked every 20 ms meanwhile (from another process) and the API server's memory read after; then a stopped
engine, a killed API server, a pixel bomb and dripping media hosts.

Run it against this checkout, and against another one for a before/after comparison (the server runs the code
under --server-pythonpath; the probe itself runs this checkout's):

    python -m benchmarks.hardening
    python -m benchmarks.hardening --server-pythonpath /path/to/older/checkout

Every probe uses the server's default flags (plus an embedding model, and for the media probes a tiny
vision-language model with 127.0.0.1 as an allowed media host). Prints one table row per probe: HTTP status (or
"timeout"), seconds, the slowest /health meanwhile, and the API server's RSS afterwards.
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx

from benchmarks.common import build_preset_checkpoint
from loomserve.testing.mm_checkpoints import tiny_mm_checkpoint
from loomserve.testing.pooling_checkpoints import tiny_decoder_embedder
from loomserve.testing.probes import blank_png, health_latencies, media_host, process_exists
from loomserve.testing.server import Server

EMBEDDER = "probe-embedder"
TIMEOUT_S = 60.0  # a probe request still unanswered then is reported as a timeout


def rss_mb(pid: int) -> float:
    return int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0]) / 1024


@contextmanager
def server_of(model: str, flags: list[str], pythonpath: str | None, tmp: Path) -> Iterator[Server]:
    env = {**os.environ, "TMPDIR": str(tmp), **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    server = Server(model, ["--kv-cache-memory", "64MiB", "--uvicorn-log-level", "warning", *flags],
                    tmp / f"server-{time.monotonic_ns()}.log", env=env, cwd=pythonpath)
    with server.running(timeout=600):
        yield server


def probe(server: Server, name: str, send: Callable[[httpx.Client], httpx.Response]) -> None:
    """One row: `send`'s status and seconds, the slowest /health meanwhile, the API server's RSS afterwards."""
    def work() -> tuple[str, float]:
        t0 = time.perf_counter()
        with httpx.Client(base_url=server.url, timeout=TIMEOUT_S, trust_env=False) as client:
            try:
                status = str(send(client).status_code)
            except httpx.TimeoutException:
                status = "timeout"
        return status, time.perf_counter() - t0

    (status, seconds), latencies = health_latencies(server.url, work)
    slowest = max(latencies, default=float("nan"))
    print(f"| {name} | {status} | {seconds:.2f} | {slowest:.3f} | {rss_mb(server.process.pid):.0f} |", flush=True)


def text_probes(server: Server) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    probe(server, "small completion (baseline)", lambda c: c.post("/v1/completions", json={"prompt": "hi",
                                                                                           "max_tokens": 4}))
    probe(server, "completion, 10 MB prompt", lambda c: c.post("/v1/completions", json={
        "prompt": "hello " * (10_000_000 // 6), "max_tokens": 4}))
    probe(server, "/tokenize, 20 MB prompt", lambda c: c.post("/tokenize", json={
        "prompt": "hello " * (20_000_000 // 6)}))
    probe(server, "embeddings, 20,000 inputs", lambda c: c.post("/v1/embeddings", json={
        "model": EMBEDDER, "input": [f"text number {i}" for i in range(20_000)]}))
    probe(server, "chat, 100,000 stop strings, n=16", lambda c: c.post("/v1/chat/completions", json={
        **chat, "n": 16, "stop": [f"stop {i}" for i in range(100_000)]}))
    probe(server, "completions, 2,000 prompts x n=128", lambda c: c.post("/v1/completions", json={
        "prompt": ["hi"] * 2000, "n": 128, "max_tokens": 4}))
    probe(server, "small completion after them", lambda c: c.post("/v1/completions", json={"prompt": "hi",
                                                                                            "max_tokens": 4}))


def media_probes(server: Server, host: str) -> None:
    bomb = f"data:image/png;base64,{base64.b64encode(blank_png(9000)).decode()}"
    small = f"data:image/png;base64,{base64.b64encode(blank_png(56)).decode()}"
    large = f"data:image/png;base64,{base64.b64encode(blank_png(2800)).decode()}"

    def chat(client: httpx.Client, urls: list[str]) -> httpx.Response:
        content = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": "?"}]
        return client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                                         "max_tokens": 2})

    probe(server, "data: image (baseline)", lambda c: chat(c, [small]))
    probe(server, "12 x 9000x9000 grayscale PNGs", lambda c: chat(c, [bomb] * 12))
    probe(server, "12 x 2800x2800 grayscale PNGs (94 Mpx, within budget)", lambda c: chat(c, [large] * 12))
    with ThreadPoolExecutor(6) as pool:
        def slow() -> None:
            with httpx.Client(base_url=server.url, timeout=120, trust_env=False) as client:
                try:
                    chat(client, [f"{host}/drip"])
                except httpx.TimeoutException:
                    pass  # the server never let go of it: the row below says how long we waited

        dripping = [pool.submit(slow) for _ in range(6)]
        time.sleep(1.0)
        probe(server, "data: image, 6 dripping fetches in flight", lambda c: chat(c, [small]))
        t0 = time.perf_counter()
        for future in dripping:
            future.result()
        print(f"| (the 6 dripping fetches were answered, or given up at 120 s, {time.perf_counter() - t0:.1f} s "
              "later) | | | | |")


def healthy(server: Server) -> bool:
    try:
        return httpx.get(f"{server.url}/health", timeout=5, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def lifecycle_probes(server: Server, tmp: Path) -> None:
    engine = server.engine_pid()
    os.kill(engine, signal.SIGSTOP)
    t0 = time.perf_counter()
    try:
        while time.perf_counter() - t0 < 20 and healthy(server):
            time.sleep(0.2)
        turned = time.perf_counter() - t0
    finally:
        os.kill(engine, signal.SIGCONT)
    print(f"| engine stopped (SIGSTOP): /health stopped answering 200 after (s) | | {turned:.1f} | | |")
    server.process.kill()
    time.sleep(5)
    left = [p.name for p in tmp.glob("loomserve-*")]
    print(f"| kill -9 of the API server, 5 s later: engine alive {process_exists(engine)}, IPC folders {left} "
          "| | | | |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server-pythonpath", default=None, help="run the server from this checkout instead")
    p.add_argument("--shape", default="tiny", help="the preset (dummy weights) the text probes serve")
    kinds = ("text", "media", "lifecycle")
    p.add_argument("--probes", nargs="+", choices=kinds, default=kinds, help="which probes to run (default: all)")
    args = p.parse_args()
    print(f"server code: {args.server_pythonpath or 'this checkout'}\n")
    print("| probe | status | seconds | slowest /health s | API RSS MB |\n|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        flags = ["--load-format", "dummy", "--embedding-model", f"{EMBEDDER}={tiny_decoder_embedder()}"]
        model = str(build_preset_checkpoint(args.shape))
        if "text" in args.probes:
            with server_of(model, flags, args.server_pythonpath, tmp) as server:
                text_probes(server)
        if "media" in args.probes:
            with media_host({}, drip_interval_s=5.0) as host, server_of(
                    str(tiny_mm_checkpoint("qwen2_vl")), ["--allowed-media-domains", "127.0.0.1"],
                    args.server_pythonpath, tmp) as server:
                media_probes(server, host)
        if "lifecycle" in args.probes:  # on a server of its own: the probes above may leave one wedged
            with server_of(model, ["--load-format", "dummy"], args.server_pythonpath, tmp) as server:
                lifecycle_probes(server, tmp)


if __name__ == "__main__":
    main()

"""Online serving latency: the real HTTP server under a Poisson stream of streaming completion requests.

What it measures
----------------
The benchmark starts `loomserve serve` as a subprocess on 127.0.0.1 (a `--shape` preset with dummy weights,
or `--model PATH`), waits for `/health`, warms it up with a few untimed requests, then for each rate in
--request-rates sends --num-requests streaming `/v1/completions` requests whose arrival times form a Poisson
process of that rate (exponential gaps, fixed seed). Each prompt is random token ids below the vocabulary
(lengths uniform in [--input-len-min, --input-len-max], fresh ids per rate, so no prefix-cache hits), each
completion is exactly --output-len greedy tokens (`ignore_eos`), streamed as Server-Sent Events with
`stream_options.include_usage`. Per request, from the moment it is sent:

- TTFT: time to the first chunk that carries a choice (the first token; its text may be empty while the
  detokenizer waits for the rest of a UTF-8 character);
- ITL (inter-token latency): each later chunk's gap to the previous chunk, divided by the tokens it carries;
- e2e: time to the last chunk.

The server sends one chunk per engine output it has seen, and coalesces outputs when the HTTP side falls
behind the engine, so a chunk may carry several tokens; with logprobs off nothing says how many. Output
tokens are counted from the final usage chunk. A request whose chunk count equals its token count has
exact ITLs; otherwise (`--token-count usage`, the default) its gaps are divided by its mean tokens per chunk,
and the table's `tok/chunk` column says how much coalescing there was. `--token-count logprobs` asks for
`logprobs: 0` so every chunk lists its tokens (exact, at the price of the engine computing logprobs).

The client sends from --client-processes processes (round-robin, one shared clock, bodies encoded before
the run): one Python process reading every stream spends about as much CPU per chunk as the server does,
and its own queue would show up in the measured ITL tail. `benchmarks/engine_trace.py` replays the same
workload on the engine alone, to see which part of a tail is the engine's.

Reported per rate: completed/failed requests, request throughput and output tokens/s (over the time from
the first request sent to the last one finished), TTFT median/p99, ITL median/p99 and their ratio, e2e
median, tokens per chunk, and the client's worst lag behind the arrival schedule (a large lag means the
client, not the server, set the pace).

`--long-prompt-mix` makes a fraction of the requests (--long-fraction) carry long prompts (default 4k-8k
tokens on CUDA, 1k-2k on CPU), to see whether chunked prefill keeps decoding smooth while they arrive: the
p99/median ITL ratio should stay within 2x. Give --max-num-batched-tokens a comma list (e.g. `512,8192`) to
start one server per token budget and compare a small, chunking budget with a large one.

Every run is bounded: at most --num-requests requests and --max-duration seconds per rate (requests still
open then are cancelled and counted as failed).

    python -m benchmarks.serving --shape tiny --device cpu --request-rates 4,8,16 --num-requests 64
    python -m benchmarks.serving --shape tiny --device cpu --long-prompt-mix --max-num-batched-tokens 256,4096
    python -m benchmarks.serving --shape tiny --device cpu --api-server-count 2   # two API server processes
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np

from benchmarks.common import (
    add_model_flags,
    busy_core,
    command_line,
    environment,
    percentile,
    prompt_vocab_size,
    resolve_model,
)
from loomserve.platform.config import resolve_device
from loomserve.testing.server import Server

T = TypeVar("T")

# --------------------------------------------------------------------------------------------- arguments


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_model_flags(p, "server --load-format")
    add_workload_flags(p)
    p.add_argument("--client-processes", type=int, default=4,
                   help="processes that send the requests (round-robin) and read their streams")
    _add_server_flags(p)
    args = p.parse_args(argv)
    check_workload_args(p, args)
    return args


def add_workload_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--request-rates", type=_float_list, default=[4.0, 8.0, 16.0], help="req/s, comma separated")
    p.add_argument("--num-requests", type=int, default=64, help="requests per rate")
    p.add_argument("--input-len-min", type=int, default=32)
    p.add_argument("--input-len-max", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64, help="max_tokens of every request (EOS ignored)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--long-prompt-mix", action="store_true", help="give a fraction of requests long prompts")
    p.add_argument("--long-fraction", type=float, default=0.1)
    p.add_argument("--long-input-len-min", type=int, default=None, help="default: 4096 on CUDA, 1024 on CPU")
    p.add_argument("--long-input-len-max", type=int, default=None, help="default: 8192 on CUDA, 2048 on CPU")
    p.add_argument("--token-count", choices=["usage", "logprobs"], default="usage",
                   help="usage: tokens from the usage chunk; logprobs: ask logprobs=0 to count each chunk's tokens")
    p.add_argument("--warmup-requests", type=int, default=8, help="untimed concurrent requests after start-up")
    p.add_argument("--max-duration", type=float, default=120.0, help="seconds per rate before giving up")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request")


def _add_server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="server --device: auto, cpu, cuda")
    p.add_argument("--dtype", default=None)
    p.add_argument("--max-num-batched-tokens", type=_int_list, default=None,
                   help="token budget per step; a comma list starts one server per budget")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-memory", default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--api-server-count", type=int, default=None,
                   help="server --api-server-count: API server processes sharing the engine (default: the server's)")
    p.add_argument("--server-args", default="", help="more `loomserve serve` flags, one shell-quoted string")
    p.add_argument("--contended", action="store_true",
                   help="measure beside a bounded background load: one process spinning on one core")
    p.add_argument("--server-timeout", type=float, default=600.0, help="seconds to wait for /health")
    p.add_argument("--server-log-dir", default=None, help="keep the servers' logs here (default: a temp folder)")


def check_workload_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 1 <= args.input_len_min <= args.input_len_max:
        p.error("need 1 <= --input-len-min <= --input-len-max")
    if args.num_requests < 1 or not args.request_rates or min(args.request_rates) <= 0:
        p.error("need --num-requests >= 1 and positive --request-rates")
    if not 0 < args.long_fraction <= 1:
        p.error("--long-fraction must be in (0, 1]")
    cuda = resolve_device(args.device).type == "cuda"
    args.long_input_len_min = args.long_input_len_min or (4096 if cuda else 1024)
    args.long_input_len_max = args.long_input_len_max or (8192 if cuda else 2048)
    if not 1 <= args.long_input_len_min <= args.long_input_len_max:
        p.error("need 1 <= --long-input-len-min <= --long-input-len-max")


# ---------------------------------------------------------------------------------------------- workload


@dataclass
class RequestSpec:
    prompt: list[int]
    arrival: float  # seconds after the run starts
    long: bool = False


def sample_requests(args: argparse.Namespace, vocab_size: int, rate: float, run_index: int) -> list[RequestSpec]:
    """Poisson arrivals at `rate`, random prompts; token ids differ between runs (no prefix-cache hits)."""
    rng = np.random.default_rng([args.seed, run_index])
    n = args.num_requests
    gaps = rng.exponential(1.0 / rate, size=n)
    arrivals = np.cumsum(gaps) - gaps[0]
    lengths = rng.integers(args.input_len_min, args.input_len_max + 1, size=n)
    is_long = np.zeros(n, dtype=bool)
    if args.long_prompt_mix:
        num_long = max(1, round(args.long_fraction * n))
        is_long[rng.choice(n, size=num_long, replace=False)] = True
        long_lengths = rng.integers(args.long_input_len_min, args.long_input_len_max + 1, size=n)
        lengths = np.where(is_long, long_lengths, lengths)
    return [
        RequestSpec(rng.integers(0, vocab_size, size=int(length)).tolist(), float(t), bool(long))
        for length, t, long in zip(lengths, arrivals, is_long, strict=True)
    ]


# ------------------------------------------------------------------------------------------------ client


@dataclass
class RequestResult:
    long: bool
    ok: bool = False
    error: str = ""
    send_lag: float = 0.0  # sent this late after its scheduled arrival
    sent: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int | None] = field(default_factory=list)  # None: not listed (logprobs off)
    output_tokens: int = 0

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.sent

    @property
    def e2e(self) -> float:
        return self.chunk_times[-1] - self.sent

    @property
    def exact(self) -> bool:
        """Whether each chunk's token count is known (listed, or one token per chunk)."""
        return None not in self.chunk_tokens or len(self.chunk_times) == self.output_tokens

    def itls(self) -> list[float]:
        """Per-token latencies after the first chunk: a chunk's gap over its tokens, once per token."""
        out: list[float] = []
        counts = self._token_counts()
        prev = self.chunk_times[0] if self.chunk_times else 0.0
        for now, k in zip(self.chunk_times[1:], counts[1:], strict=True):
            n = round(k)
            if n == 0:  # a chunk without tokens (none expected): its gap belongs to the next token
                continue
            out.extend([(now - prev) / k] * n)
            prev = now
        return out

    def _token_counts(self) -> list[float]:
        if None not in self.chunk_tokens:
            return [float(k) for k in self.chunk_tokens]  # type: ignore[arg-type]
        if len(self.chunk_times) == self.output_tokens:
            return [1.0] * len(self.chunk_times)
        mean = self.output_tokens / len(self.chunk_times)
        return [mean] * len(self.chunk_times)


def request_body(spec: RequestSpec, args: argparse.Namespace) -> bytes:
    """The request's JSON, encoded ahead of its send (an 8k-token prompt takes the event loop a millisecond to
    encode, a stall every open stream's next chunk would wait for)."""
    body = {
        "prompt": spec.prompt,
        "max_tokens": args.output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.token_count == "logprobs":
        body["logprobs"] = 0
    return json.dumps(body).encode()


async def send_request(client: httpx.AsyncClient, spec: RequestSpec, body: bytes, output_len: int,
                       start: float) -> RequestResult:
    """One streamed completion of `body` (its request_body)."""
    result = RequestResult(long=spec.long)
    result.sent = time.perf_counter()
    result.send_lag = result.sent - start - spec.arrival
    headers = {"content-type": "application/json"}
    try:
        async with client.stream("POST", "/v1/completions", content=body, headers=headers) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            await _read_events(response, result)
    except (httpx.HTTPError, OSError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    _check_complete(result, output_len)
    return result


async def _read_events(response: httpx.Response, result: RequestResult) -> None:
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        now = time.perf_counter()
        event = json.loads(payload)
        if "error" in event:
            raise ValueError(f"error event: {event['error']}")
        choices = event.get("choices") or []
        if choices:
            result.chunk_times.append(now)
            logprobs = choices[0].get("logprobs")
            result.chunk_tokens.append(len(logprobs["tokens"]) if logprobs else None)
        if event.get("usage"):
            result.output_tokens = event["usage"]["completion_tokens"]


def _check_complete(result: RequestResult, output_len: int) -> None:
    if not result.chunk_times:
        result.error = "no chunk with a choice"
    elif result.output_tokens != output_len:
        result.error = f"{result.output_tokens} output tokens (usage), expected {output_len}"
    else:
        result.ok = True


def make_client(base_url: str, args: argparse.Namespace) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=httpx.Timeout(args.request_timeout),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        trust_env=False,  # loopback only: no proxies from the environment
    )


def run_rate(base_url: str, specs: list[RequestSpec], args: argparse.Namespace) -> tuple[list[RequestResult], float]:
    """Send `specs` on their schedule from --client-processes processes, round-robin (one process reading every
    stream would queue); (results, seconds from the first send to the last request's end)."""
    n = max(1, min(args.client_processes, len(specs)))
    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(n + 1)
    with context.Pool(n, initializer=_wait_for_all, initargs=(ready,)) as pool:
        ready.wait()  # every process started and imported before the clock starts
        start = time.perf_counter() + 0.05
        parts = pool.starmap(_client_process, [(base_url, specs[i::n], args, start) for i in range(n)])
    results: list[RequestResult] = [RequestResult(long=False)] * len(specs)
    for i, part in enumerate(parts):
        results[i::n] = part
    ends = [r.chunk_times[-1] for r in results if r.ok]
    return results, (max(ends) - start) if ends else time.perf_counter() - start


def _wait_for_all(ready: Any) -> None:
    ready.wait()


def _client_process(base_url: str, specs: list[RequestSpec], args: argparse.Namespace,
                    start: float) -> list[RequestResult]:
    return run_async(send_on_schedule(base_url, specs, args, start))


async def send_on_schedule(base_url: str, specs: list[RequestSpec], args: argparse.Namespace,
                           start: float) -> list[RequestResult]:
    """Send each spec at `start` + its arrival (perf_counter time, which all processes share on one host)."""
    bodies = [request_body(spec, args) for spec in specs]
    async with make_client(base_url, args) as client:
        deadline = start + args.max_duration
        tasks: list[asyncio.Task[RequestResult]] = []
        for spec, body in zip(specs, bodies, strict=True):
            delay = min(start + spec.arrival, deadline) - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.perf_counter() >= deadline:
                break
            tasks.append(asyncio.create_task(send_request(client, spec, body, args.output_len, start)))
        if tasks:
            await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
        results = [await _collect(task, spec) for task, spec in zip(tasks, specs, strict=False)]
    return results + [RequestResult(long=s.long, error="not sent before --max-duration") for s in specs[len(tasks):]]


async def _collect(task: asyncio.Task[RequestResult], spec: RequestSpec) -> RequestResult:
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return RequestResult(long=spec.long, error="still open at --max-duration")


async def warm_up(base_url: str, specs: list[RequestSpec], args: argparse.Namespace) -> None:
    """First-use costs (kernel compilation, allocator growth) out of the timed runs; all sent at once."""
    async with make_client(base_url, args) as client:
        bodies = [request_body(s, args) for s in specs]
        results = await asyncio.gather(*(send_request(client, s, b, args.output_len, time.perf_counter())
                                         for s, b in zip(specs, bodies, strict=True)))
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(specs)} warm-up requests failed, e.g. {failed[0]}")


# ------------------------------------------------------------------------------------------------ server


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, on uvloop where it is installed (the client's event loop should not set the pace)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro) if hasattr(uvloop, "run") else asyncio.run(coro)


def server_flags(args: argparse.Namespace, load_format: str, budget: int | None) -> list[str]:
    """`loomserve serve` flags for this run's engine settings and token budget."""
    flags = ["--load-format", load_format, "--device", args.device, "--uvicorn-log-level", "warning"]
    optional = {
        "--dtype": args.dtype,
        "--max-num-batched-tokens": budget,
        "--max-num-seqs": args.max_num_seqs,
        "--max-model-len": args.max_model_len,
        "--kv-cache-memory": args.kv_cache_memory,
        "--gpu-memory-utilization": args.gpu_memory_utilization,
        "--api-server-count": args.api_server_count,
    }
    for flag, value in optional.items():
        if value is not None:
            flags += [flag, str(value)]
    return flags + shlex.split(args.server_args)


# ----------------------------------------------------------------------------------------------- metrics


@dataclass
class RateSummary:
    rate: float
    results: list[RequestResult]
    duration: float

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.ok]

    def row(self) -> list[str]:
        ok = self.ok
        ttft = [r.ttft for r in ok]
        itl = [x for r in ok for x in r.itls()]
        tokens = sum(r.output_tokens for r in ok)
        chunks = sum(len(r.chunk_times) for r in ok)
        lag = max((r.send_lag for r in self.results if r.sent), default=0.0)
        ratio = percentile(itl, 99) / percentile(itl, 50) if itl else float("nan")
        return [
            f"{self.rate:g}",
            f"{len(ok)}/{len(self.results) - len(ok)}",
            f"{len(ok) / self.duration:.2f}",
            f"{tokens / self.duration:,.0f}",
            f"{1e3 * percentile(ttft, 50):.1f}",
            f"{1e3 * percentile(ttft, 99):.1f}",
            f"{1e3 * percentile(itl, 50):.2f}",
            f"{1e3 * percentile(itl, 99):.2f}",
            f"{ratio:.2f}",
            f"{percentile([r.e2e for r in ok], 50):.2f}",
            f"{tokens / chunks:.2f}" if chunks else "-",
            f"{1e3 * lag:.0f}",
        ]

    def notes(self) -> list[str]:
        out = []
        failed = [r.error for r in self.results if not r.ok]
        if failed:
            out.append(f"rate {self.rate:g}: {len(failed)} failed, e.g. {failed[0]}")
        inexact = sum(not r.exact for r in self.ok)
        if inexact:
            out.append(f"rate {self.rate:g}: {inexact} requests got coalesced chunks: their ITLs are gap / mean "
                       "tokens per chunk (--token-count logprobs counts exactly)")
        long = [r for r in self.ok if r.long]
        if long:
            long_ttft = [r.ttft for r in long]
            short_itl = [x for r in self.ok if not r.long for x in r.itls()]
            out.append(
                f"rate {self.rate:g}: {len(long)} long-prompt requests, "
                f"TTFT median {1e3 * percentile(long_ttft, 50):.0f} ms"
                f" / p99 {1e3 * percentile(long_ttft, 99):.0f} ms; short requests' ITL p99/median "
                f"{percentile(short_itl, 99) / percentile(short_itl, 50):.2f}"
            )
        return out


HEADER = ["rate", "ok/failed", "req/s", "out tok/s", "TTFT med ms", "TTFT p99 ms", "ITL med ms", "ITL p99 ms",
          "ITL p99/med", "e2e med s", "tok/chunk", "max send lag ms"]


def _widths() -> list[int]:
    return [max(len(h), 9) for h in HEADER]


def table_header() -> str:
    sep = "|" + "|".join("-" * (w + 1) + ":" for w in _widths()) + "|"
    return "\n".join([table_row(HEADER), sep])


def table_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, _widths(), strict=True)) + " |"


# ----------------------------------------------------------------------------------------------- reports


def describe_workload(args: argparse.Namespace) -> dict[str, str]:
    model = f"{args.model}" if args.model else f"--shape {args.shape} (dummy weights)"
    workload = (
        f"{args.num_requests} requests per rate, Poisson arrivals; prompts {args.input_len_min}-{args.input_len_max} "
        f"random token ids, {args.output_len} output tokens each (greedy, ignore_eos), streamed"
    )
    if args.long_prompt_mix:
        workload += (f"; {args.long_fraction:.0%} of requests with long prompts of "
                     f"{args.long_input_len_min}-{args.long_input_len_max} tokens")
    return {
        "model": model,
        "workload": workload,
        "token count": args.token_count,
        "background load": "one busy core (--contended)" if args.contended else "none added",
        "command": command_line(),
    }


def print_block(items: dict[str, str]) -> None:
    for key, value in items.items():
        print(f"{key:>18}: {value}", flush=True)


# -------------------------------------------------------------------------------------------------- main


def bench_server(args: argparse.Namespace, model_path: Path, load_format: str, vocab: int, budget: int | None,
                 log_dir: Path, server_index: int) -> None:
    flags = server_flags(args, load_format, budget)
    server = Server(str(model_path), flags, log_dir / f"server-{server_index}.log")
    print(f"\n## server {server_index}: max-num-batched-tokens {budget or 'default'}", flush=True)
    print(f"    {shlex.join(server.command[1:])}", flush=True)
    with server.running(args.server_timeout) as startup_s:
        print(f"    healthy after {startup_s:.1f} s", flush=True)
        bench_url(server.url, args, vocab, server_index)


def bench_url(url: str, args: argparse.Namespace, vocab: int, server_index: int) -> None:
    """Warm up the server at `url`, then run and print every rate (`server_index` picks the runs' token ids)."""
    t0 = time.perf_counter()
    run_async(warm_up(url, warmup_specs(args, vocab), args))
    print(f"    warm-up ({args.warmup_requests} requests) {time.perf_counter() - t0:.1f} s\n", flush=True)
    print(table_header(), flush=True)
    summaries = []
    for i, rate in enumerate(args.request_rates):
        specs = sample_requests(args, vocab, rate, run_index=1000 * server_index + i + 1)
        results, duration = run_rate(url, specs, args)
        summaries.append(RateSummary(rate, results, duration))
        print(table_row(summaries[-1].row()), flush=True)
    for note in (n for s in summaries for n in s.notes()):
        print(f"  - {note}")
    sys.stdout.flush()


def warmup_specs(args: argparse.Namespace, vocab: int) -> list[RequestSpec]:
    """Warm-up prompts of the workload's lengths (and one long one in the long-prompt mix)."""
    rng = np.random.default_rng([args.seed, 999_999])
    lengths = rng.integers(args.input_len_min, args.input_len_max + 1, size=args.warmup_requests).tolist()
    if args.long_prompt_mix:
        lengths.append(args.long_input_len_max)
    return [RequestSpec(rng.integers(0, vocab, size=n).tolist(), 0.0) for n in lengths]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` still stops the servers (finally)
    t0 = time.perf_counter()
    model_path, load_format = resolve_model(args)
    vocab = prompt_vocab_size(model_path)
    print_block({**environment(resolve_device(args.device)), **describe_workload(args)})
    print("\nColumns: rate = offered req/s; req/s and out tok/s over first send .. last finish; TTFT and e2e "
          "from send; ITL = chunk gap / tokens in chunk; max send lag = client behind the arrival schedule.")
    log_dir = Path(args.server_log_dir or tempfile.mkdtemp(prefix="loomserve-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    status = 0
    with busy_core(args.contended):
        for index, budget in enumerate(args.max_num_batched_tokens or [None]):
            try:
                bench_server(args, model_path, load_format, vocab, budget, log_dir, index)
            except RuntimeError as exc:  # this server failed; the next one may still run
                print(f"    FAILED: {exc}", flush=True)
                status = 1
    print(f"\nserver logs in {log_dir}; total {time.perf_counter() - t0:.0f} s", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())

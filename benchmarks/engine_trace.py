"""The serving benchmark's workload replayed against the engine alone, to tell the engine's share of the
inter-token-latency tail from the HTTP front end's and the client's.

Same requests as `benchmarks/serving.py` (Poisson arrivals, random prompts, the long-prompt mix), submitted to
an in-process engine (the server's defaults: async scheduling and CUDA graphs on CUDA) when their arrival
time comes; every engine step's landing is timestamped. A token's ITL is the time between its request's
landings, as a streaming client would see it with a front end that costs nothing. Prints the ITL table and
the landed steps grouped by what they carried (decodes only, or a prefill chunk at a given context), so a
tail can be traced to the steps that make it.

    python -m benchmarks.engine_trace --shape qwen2.5-0.5b --device cuda --input-len-min 128 \
        --input-len-max 512 --output-len 256 --long-prompt-mix --request-rates 16 --num-requests 300 \
        --max-num-batched-tokens 128
"""

from __future__ import annotations

import argparse
import math
import time
from collections import deque
from dataclasses import dataclass, field

from benchmarks.common import add_model_flags, percentile, prompt_vocab_size, resolve_model
from benchmarks.serving import (
    RequestSpec,
    add_workload_flags,
    check_workload_args,
    sample_requests,
    warmup_specs,
)
from loomserve import LLM, SamplingParams
from loomserve.platform.output_processor import OutputProcessor
from loomserve.platform.step import ScheduledStep

CONTEXT_BINS = (0, 1024, 2048, 4096, 6144, 8192, 1 << 30)  # a prefill chunk's context (tokens cached before it)


@dataclass
class Landing:
    interval: float  # seconds since the previous landing (nan after an idle engine)
    prefill_context: int  # the largest context a prefill chunk of the step attends over; -1: decodes only


@dataclass
class Trace:
    landings: list[Landing] = field(default_factory=list)
    itl: list[tuple[float, int]] = field(default_factory=list)  # (seconds, index of the landing)
    ttft: list[float] = field(default_factory=list)


def prefill_context(step: ScheduledStep) -> int:
    """The largest context a prefill chunk of a scheduled step attends over; -1 when the step only decodes (a decode
    runs one token, a chunk more)."""
    return max((s.start for s in step.scheduled if s.num_new_tokens > 1), default=-1)


def replay(llm: LLM, specs: list[RequestSpec], output_len: int) -> Trace:
    """Submit `specs` on their schedule and step the engine until every request finishes."""
    engine = llm.engine
    processor = OutputProcessor(llm.tokenizer, final_only=True)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    trace, contexts = Trace(), deque()
    land = engine._land

    def timed_land(out, step):  # the steps an engine.step() call lands, in order
        contexts.append(prefill_context(out))
        return land(out, step)

    engine._land = timed_land
    pending, sent, last = deque(enumerate(specs)), {}, {}
    start = prev = time.perf_counter()
    try:
        while pending or engine.has_requests():
            now = time.perf_counter()
            while pending and pending[0][1].arrival <= now - start:
                i, spec = pending.popleft()
                sent[str(i)] = time.perf_counter()
                for child, cp in processor.add_request(str(i), None, spec.prompt, params, time.time()):
                    engine.add_request(llm.input_processor.engine_request(child, spec.prompt, cp))
            if not engine.has_requests():
                time.sleep(max(0.0, start + pending[0][1].arrival - time.perf_counter()))
                prev = float("nan")
                continue
            outputs = engine.step().outputs
            t = time.perf_counter()
            while contexts:
                trace.landings.append(Landing(t - prev, contexts.popleft()))
                prev = t
            for out in outputs:
                if not out.new_token_ids:
                    continue
                if out.request_id in last:
                    trace.itl.append(((t - last[out.request_id]) / len(out.new_token_ids), len(trace.landings) - 1))
                else:
                    trace.ttft.append(t - sent[out.request_id])
                last[out.request_id] = t
            processor.process_outputs(outputs)
    finally:
        engine._land = land
    return trace


def report(budget: int | None, trace: Trace) -> None:
    itl = [s * 1e3 for s, _ in trace.itl]
    ttft = [s * 1e3 for s in trace.ttft]
    med, p99 = percentile(itl, 50), percentile(itl, 99)
    print(f"| {budget or 'default'} | {len(trace.landings)} | {med:.2f} | {p99:.2f} | {p99 / med:.2f} | "
          f"{percentile(ttft, 50):.1f} | {percentile(ttft, 99):.1f} |")
    slow = [i for s, i in trace.itl if s * 1e3 > 2 * med]
    print(f"\n  landed steps, budget {budget or 'default'} ({len(slow)} ITL samples above 2x the median):\n")
    print("  | step carries | steps | interval med ms | interval p99 ms | share of the slow ITL samples |")
    print("  |---|---:|---:|---:|---:|")
    for name, lo, hi in [("decodes only", -1, 0)] + [
        (f"a chunk at context {lo}-{hi if hi < 1 << 30 else 'max'}", lo, hi)
        for lo, hi in zip(CONTEXT_BINS[:-1], CONTEXT_BINS[1:], strict=True)
    ]:
        members = {i for i, s in enumerate(trace.landings) if lo <= s.prefill_context < hi}
        if not members:
            continue
        intervals = [trace.landings[i].interval * 1e3 for i in members if not math.isnan(trace.landings[i].interval)]
        share = sum(i in members for i in slow) / max(1, len(slow))
        interval_med, interval_p99 = percentile(intervals, 50), percentile(intervals, 99)
        print(f"  | {name} | {len(members)} | {interval_med:.2f} | {interval_p99:.2f} | {share:.0%} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_flags(p, "engine load format")
    add_workload_flags(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget per step")
    args = p.parse_args()
    check_workload_args(p, args)
    model_path, load_format = resolve_model(args)
    vocab = prompt_vocab_size(model_path)
    print(f"{args.num_requests} requests at {args.request_rates} req/s, prompts {args.input_len_min}-"
          f"{args.input_len_max}, {args.output_len} output tokens, long-prompt mix {args.long_prompt_mix}")
    print("\n| budget | steps | ITL med ms | ITL p99 ms | ITL p99/med | TTFT med ms | TTFT p99 ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    budget = args.max_num_batched_tokens
    llm = LLM(str(model_path), load_format=load_format, device=args.device, max_num_batched_tokens=budget)
    replay(llm, warmup_specs(args, vocab), args.output_len)
    for i, rate in enumerate(args.request_rates):
        report(budget, replay(llm, sample_requests(args, vocab, rate, run_index=i + 1), args.output_len))


if __name__ == "__main__":
    main()

"""Where a decode step's time goes: the engine's stages timed one by one on a steady decode batch.

Submits N requests (prompt lengths uniform in [a, b], dummy weights of a preset shape), runs until every
prompt is prefilled, then times --steps pure-decode steps, splitting each into: scheduling, input
preparation, the model (forward or CUDA-graph replay, synchronized), sampling (metadata, sampler, copy to
host), the scheduler's update, and the front end's output processing (detokenization). Prints a table.
With --mixed-prefill C a long prompt arrives as the timing starts and every timed step also carries a
C-token chunk of it (chunked prefill beside the decodes): the step that sets the ITL tail.

    python -m benchmarks.profile_decode --shape qwen2.5-0.5b --device cuda --num-prompts 256
    python -m benchmarks.profile_decode --shape qwen2.5-0.5b --device cuda --num-prompts 256 --mixed-prefill 256
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
import torch

from benchmarks.common import PRESETS, build_preset_checkpoint, prompt_vocab_size
from loomserve import LLM, SamplingParams
from loomserve.platform.output_processor import OutputProcessor

STAGES = ("schedule", "prepare_inputs", "model", "sample", "update", "output_processing")


def timed(totals: dict[str, float], name: str, fn, sync: bool = False):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        if sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        totals[name] += time.perf_counter() - start
        return result

    return wrapper


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--device", default="auto")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len-min", type=int, default=100)
    p.add_argument("--input-len-max", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--mixed-prefill", type=int, default=0, metavar="C",
                   help="every timed step also prefills C tokens of one long prompt")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--kernels", type=int, default=0, metavar="K",
                   help="after the timed steps, profile 10 more with torch.profiler and print the top K kernels")
    p.add_argument("--async-scheduling", action="store_true",
                   help="time whole steps with async scheduling (the per-stage split needs synchronous steps)")
    args = p.parse_args()
    path = build_preset_checkpoint(args.shape)
    chunk = args.mixed_prefill
    long_len = (args.steps + 4 + 10) * chunk  # a chunk for every step: warm-up, timed, and --kernels'
    llm = LLM(str(path), load_format="dummy", device=args.device, max_model_len=max(2048, long_len + 64),
              max_num_seqs=args.num_prompts + 1, enforce_eager=args.enforce_eager,
              async_scheduling=args.async_scheduling,
              max_num_batched_tokens=args.num_prompts + chunk if chunk else None)
    rng = np.random.default_rng(0)
    vocab = prompt_vocab_size(path)
    params = SamplingParams(temperature=0.0, max_tokens=args.steps + 64, ignore_eos=True)
    processor = OutputProcessor(llm.tokenizer, final_only=True)  # as LLM.generate does

    def submit(request_id: str, ids: list[int]) -> None:
        for child, cp in processor.add_request(request_id, None, ids, params, time.time()):
            llm.engine.add_request(llm.input_processor.engine_request(child, ids, cp))

    for i in range(args.num_prompts):
        submit(str(i), rng.integers(0, vocab, rng.integers(args.input_len_min, args.input_len_max + 1)).tolist())
    engine = llm.engine
    while engine.scheduler.waiting or any(r.num_output_tokens == 0 for r in engine.scheduler.running):
        processor.process_outputs(engine.step().outputs)
    if chunk:
        submit("long", rng.integers(0, vocab, long_len).tolist())
        for _ in range(3):  # untimed: the first mixed steps compile kernels for their shapes
            processor.process_outputs(engine.step().outputs)

    totals: dict[str, float] = defaultdict(float)
    runner, scheduler = engine.executor.runner, engine.scheduler
    if not args.async_scheduling:
        _instrument(totals, runner, scheduler)
    start = time.perf_counter()
    for _ in range(args.steps):
        outputs = engine.step().outputs
        t = time.perf_counter()
        processor.process_outputs(outputs)
        totals["output_processing"] += time.perf_counter() - t
    wall = time.perf_counter() - start
    batch = args.num_prompts
    mode = "async scheduling" if args.async_scheduling else "synchronous steps"
    mixed = f" + a {chunk}-token prefill chunk" if chunk else ""
    print(f"{args.shape} on {args.device}, {mode}, {batch} sequences decoding{mixed}, {args.steps} steps, "
          f"{wall / args.steps * 1e3:.2f} ms/step ({batch * args.steps / wall:,.0f} tok/s)")
    print("| stage | ms/step | share |\n|---|---|---|")
    for name in STAGES:
        ms = totals[name] / args.steps * 1e3
        print(f"| {name} | {ms:.3f} | {totals[name] / wall:.0%} |")
    other = wall - sum(totals.values())
    print(f"| other (step glue, sampling metadata, outputs) | {other / args.steps * 1e3:.3f} | {other / wall:.0%} |")
    if args.kernels:
        _print_kernels(engine, processor, args.kernels)


def _print_kernels(engine, processor: OutputProcessor, top: int, steps: int = 10) -> None:
    """The device kernels of `steps` more steps, by total time (per step)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            processor.process_outputs(engine.step().outputs)
    print(f"torch.profiler over {steps} steps (totals, not per step):")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=60))


def _instrument(totals: dict[str, float], runner, scheduler) -> None:
    scheduler.schedule = timed(totals, "schedule", scheduler.schedule)
    runner.input_batch.prepare = timed(totals, "prepare_inputs", runner.input_batch.prepare, sync=True)
    runner._run_model = timed(totals, "model", runner._run_model, sync=True)
    runner.sampler.forward = timed(totals, "sample", runner.sampler.forward)
    scheduler.update_from_output = timed(totals, "update", scheduler.update_from_output)

if __name__ == "__main__":
    main()

"""Offline generation throughput: loomserve's `LLM.generate` against transformers on the same workload.

What it measures
----------------
N requests of random prompt token ids (lengths uniform in [--input-len-min, --input-len-max], fixed seed),
each generating exactly --output-len tokens greedily with EOS ignored. All requests are submitted at once
(offline batch); the clock runs from submission to the last output. Model load and warm-up are excluded:
each system first serves a couple of short requests (the engine) and one untimed cold run of a workload
with the same lengths but other token ids (first-use costs: CUDA kernel loading, allocator growth,
transformers' own warm-up); then --repeats timed runs, each on fresh token ids so no prefix cache hits,
and the fastest is reported (the machine may be shared: all runs are listed).
Reported: output tokens/s, total (prompt + output) tokens/s, wall time and requests/s, then the same
workload through transformers (`generate_batch` continuous batching, or plain padded `generate`) with a
model of the same config, dtype and random weights (values don't matter: EOS is ignored), and the ratio.

The engine's steps are timed individually (a wrapper around `EngineCore.step`). On CUDA each pure-decode
step is compared with a memory-bandwidth floor:

    bytes(step) = weight bytes read per step                 (every parameter; the input embedding
                                                              only when it is tied to the lm_head)
                + sum over the step's sequences of context_len * 2 * layers * kv_heads * head_dim * itemsize
    floor(step) = bytes(step) / copy bandwidth                (2 * buffer bytes / time of a large
                                                              device-to-device `copy_`)

and `floor / measured` (summed over all pure-decode steps) says how close decoding runs to the memory
roofline (1.0 = at the floor; activations, logits and launch overheads are left out of the floor).

Model shapes come from `--shape` presets (a config-only checkpoint folder with a tokenizer covering the
whole vocabulary is written into a cache folder; the engine uses `load_format="dummy"`) or `--model PATH`.

    python -m benchmarks.throughput --shape tiny --num-prompts 64 --input-len-min 32 --input-len-max 128 \
        --output-len 64 --baseline generate_batch
"""

from __future__ import annotations

import argparse
import gc
import inspect
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import add_model_flags, command_line, environment, prompt_vocab_size, resolve_model
from loomserve.platform.config import resolve_device, resolve_dtype

# ----------------------------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_model_flags(p, "engine load_format")
    add_workload_flags(p, input_len=(32, 128), output_len=64)
    add_engine_flags(p)
    p.add_argument("--baseline", choices=["generate_batch", "static", "none"], default="generate_batch")
    p.add_argument("--baseline-batch-size", type=int, default=64, help="batch size of --baseline static")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per system; the fastest is reported")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if not 1 <= args.input_len_min <= args.input_len_max:
        p.error("need 1 <= --input-len-min <= --input-len-max")
    return args


def add_workload_flags(p: argparse.ArgumentParser, input_len: tuple[int, int], output_len: int) -> None:
    """--num-prompts, --input-len-min/max, --output-len and --seed, with the script's default lengths."""
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len-min", type=int, default=input_len[0])
    p.add_argument("--input-len-max", type=int, default=input_len[1])
    p.add_argument("--output-len", type=int, default=output_len)
    p.add_argument("--seed", type=int, default=0)


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """--device, --dtype, the engine's batch and memory limits and --enforce-eager."""
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", help="auto = float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-memory", default=None, help="KV cache size, e.g. 4GiB (default: engine's choice)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs in the engine")


# ---------------------------------------------------------------------------------------------- workload


@dataclass
class Workload:
    """Fixed prompt lengths; token ids drawn per variant, so repeated runs never hit a prefix cache."""

    lengths: list[int]
    vocab_size: int
    output_len: int
    seed: int

    @classmethod
    def sample(cls, args: argparse.Namespace, vocab_size: int) -> Workload:
        rng = np.random.default_rng(args.seed)
        lengths = rng.integers(args.input_len_min, args.input_len_max + 1, size=args.num_prompts)
        return cls([int(n) for n in lengths], vocab_size, args.output_len, args.seed)

    def prompts(self, variant: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, variant])
        return [rng.integers(0, self.vocab_size, size=n).tolist() for n in self.lengths]

    def warmup_prompts(self, num: int = 4) -> list[list[int]]:
        """A couple of short requests to warm kernels and allocators up."""
        rng = np.random.default_rng([self.seed, 1 << 20])
        return [rng.integers(0, self.vocab_size, size=int(n)).tolist() for n in rng.integers(8, 17, size=num)]

    @property
    def prompt_tokens(self) -> int:
        return sum(self.lengths)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------- measurements


@dataclass
class RunResult:
    name: str
    wall_s: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    expected_output_tokens: int
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def output_tps(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def total_tps(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.wall_s

    @property
    def rps(self) -> float:
        return self.num_requests / self.wall_s


Timed = Callable[[int], tuple[float, int]]  # workload variant -> (wall seconds, output tokens produced)


def measure(name: str, workload: Workload, repeats: int, run: Timed, extra: dict[str, str] | None = None) -> RunResult:
    """One cold run on a workload of the same lengths but other token ids (first-use costs: CUDA kernel
    loading, cuBLAS heuristics, allocator growth, transformers' own warm-up), then `repeats` timed runs on
    fresh token ids each (no prefix-cache hits); the fastest timed run is reported, all are listed."""
    cold, _ = run(repeats)
    runs = [run(variant) for variant in range(repeats)]
    wall, produced = min(runs)
    listed = {"cold run (untimed)": f"{cold:.2f} s"}
    if repeats > 1:
        listed["timed runs"] = ", ".join(f"{w:.2f}" for w, _ in runs) + " s"
    return RunResult(
        name=name,
        wall_s=wall,
        num_requests=len(workload.lengths),
        prompt_tokens=workload.prompt_tokens,
        output_tokens=produced,
        expected_output_tokens=len(workload.lengths) * workload.output_len,
        extra={**listed, **(extra or {})},
    )


@dataclass
class StepRecord:
    seconds: float  # the whole EngineCore.step (schedule + prepare + forward + sample + update)
    pure_decode: bool
    num_seqs: int
    num_tokens: int
    context_tokens: int  # sum over the step's sequences of their context length after the step


class StepRecorder:
    """Wraps one EngineCore instance's `step` (and its runner's `launch`, to see the batch) to time steps."""

    def __init__(self, engine: Any, device: torch.device) -> None:
        self.records: list[StepRecord] = []
        self.enabled = False
        self.device = device
        self._batch: tuple[bool, int, int, int] | None = None
        runner = engine.executor.runner
        launch, step = runner.launch, engine.step

        def timed_launch(out: Any, *args: Any) -> Any:
            sched = out.scheduled
            self._batch = (
                all(s.num_new_tokens == 1 for s in sched),
                len(sched),
                sum(s.num_new_tokens for s in sched),
                sum(s.start + s.num_new_tokens for s in sched),
            )
            return launch(out, *args)

        def timed_step() -> Any:
            if not self.enabled:
                return step()
            self._batch = None
            start = time.perf_counter()
            result = step()  # no device sync: with async scheduling steps overlap, so this is the mean step time
            if self._batch is not None:
                self.records.append(StepRecord(time.perf_counter() - start, *self._batch))
            return result

        runner.launch = timed_launch
        engine.step = timed_step

    def decode_steps(self) -> list[StepRecord]:
        return [r for r in self.records if r.pure_decode]


def measure_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Device memory bandwidth in bytes/s from a large `copy_` (counts the read and the write)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    synchronize(device)
    seconds = time.perf_counter() - start
    del src, dst
    free_memory(device)
    return 2 * nbytes * iters / seconds


def weight_bytes_per_step(model: torch.nn.Module) -> int:
    """Bytes of parameters a decode step reads: all of them, except an untied input embedding (only the
    rows of the batch's tokens are gathered)."""
    params = {id(p): p for p in model.parameters()}  # tied weights count once
    total = sum(p.numel() * p.element_size() for p in params.values())
    embed = model.get_submodule("model.embed_tokens").weight
    lm_head = getattr(model, "lm_head", None)
    if lm_head is None or lm_head.weight is not embed:
        total -= embed.numel() * embed.element_size()
    return total


def kv_bytes_per_token(model_config: Any) -> int:
    itemsize = torch.empty((), dtype=model_config.dtype).element_size()
    return 2 * model_config.num_layers * model_config.num_kv_heads * model_config.head_dim * itemsize


StepWeightBytes = Callable[[StepRecord], int]  # weight bytes a decode step reads


def dense_weight_bytes(model: torch.nn.Module) -> StepWeightBytes:
    """Every step reads the same weights (`weight_bytes_per_step`)."""
    weights = weight_bytes_per_step(model)
    return lambda record: weights


def roofline_summary(
    decode: list[StepRecord], weight_bytes: StepWeightBytes, kv_per_token: int, bandwidth: float
) -> dict[str, str]:
    weights = [weight_bytes(r) for r in decode]
    floor = sum((w + r.context_tokens * kv_per_token) / bandwidth for w, r in zip(weights, decode, strict=True))
    measured = sum(r.seconds for r in decode)
    mean_weights = sum(weights) / len(decode)
    mean_bytes = mean_weights + kv_per_token * sum(r.context_tokens for r in decode) / len(decode)
    return {
        "copy bandwidth": f"{bandwidth / 1e12:.2f} TB/s",
        "bytes / decode step (mean)": f"{mean_bytes / 1e6:.1f} MB (weights {mean_weights / 1e6:.1f} MB)",
        "floor / decode step (mean)": f"{floor / len(decode) * 1e3:.3f} ms",
        "bandwidth floor / measured": f"{floor / measured:.3f}",
    }


def step_summary(recorder: StepRecorder) -> dict[str, str]:
    decode = recorder.decode_steps()
    mixed = [r for r in recorder.records if not r.pure_decode]
    out = {"engine steps": f"{len(recorder.records)} ({len(decode)} pure decode, {len(mixed)} with prefill)"}
    if decode:
        mean = sum(r.seconds for r in decode) / len(decode)
        batch = sum(r.num_seqs for r in decode) / len(decode)
        out["decode step (mean)"] = f"{mean * 1e3:.2f} ms at {batch:.1f} seqs/step"
    if mixed:
        mean = sum(r.seconds for r in mixed) / len(mixed)
        tokens = sum(r.num_tokens for r in mixed) / len(mixed)
        out["prefill/mixed step (mean)"] = f"{mean * 1e3:.2f} ms at {tokens:.0f} tokens/step"
    return out


# ------------------------------------------------------------------------------------------------ engine


def engine_kwargs(args: argparse.Namespace, load_format: str) -> dict[str, Any]:
    """`LLM` keyword arguments from the engine flags (`add_engine_flags`) and --seed."""
    kwargs: dict[str, Any] = {
        "load_format": load_format,
        "device": args.device,
        "dtype": args.dtype,
        "seed": args.seed,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_model_len": args.max_model_len,
        "kv_cache_memory": args.kv_cache_memory,
    }
    if getattr(args, "enforce_eager", False):
        kwargs["enforce_eager"] = True
    if getattr(args, "threads", None):  # else the engine's thread policy picks its own count
        kwargs["cpu_threads"] = args.threads
    return kwargs


def _engine_run(
    llm: Any,
    recorder: StepRecorder,
    params: Any,
    workload: Workload,
    steps: dict[float, list[StepRecord]],
    variant: int,
    **generate_kwargs: Any,
) -> tuple[float, int]:
    prompts = [{"prompt_token_ids": p} for p in workload.prompts(variant)]
    recorder.records, recorder.enabled = [], True
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, **generate_kwargs)
    synchronize(recorder.device)
    wall = time.perf_counter() - start
    recorder.enabled = False
    steps[wall] = recorder.records
    return wall, sum(len(o.outputs[0].token_ids) for o in outputs)


def measure_engine(
    name: str,
    llm: Any,
    recorder: StepRecorder,
    workload: Workload,
    repeats: int,
    extra: dict[str, str] | None = None,
    **generate_kwargs: Any,
) -> RunResult:
    """`measure` of `llm.generate` on the workload (greedy, EOS ignored), with the step summary of the fastest
    run, whose steps the recorder keeps; `generate_kwargs` go to every `generate` call."""
    from loomserve import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=workload.output_len, ignore_eos=True)
    steps: dict[float, list[StepRecord]] = {}
    run = partial(_engine_run, llm, recorder, params, workload, steps, **generate_kwargs)
    result = measure(name, workload, repeats, run, extra)
    recorder.records = steps[result.wall_s]
    result.extra.update(step_summary(recorder))
    return result


def run_engine(args: argparse.Namespace, model_path: Path, load_format: str, workload: Workload,
               weight_bytes: Callable[[torch.nn.Module], StepWeightBytes] = dense_weight_bytes) -> RunResult:
    from loomserve import LLM, SamplingParams

    llm = LLM(str(model_path), **engine_kwargs(args, load_format))
    device = llm.config.model_config.device
    recorder = StepRecorder(llm.engine, device)
    short = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in workload.warmup_prompts()], short)
    synchronize(device)
    result = measure_engine("loomserve", llm, recorder, workload, args.repeats)
    decode = recorder.decode_steps()
    if device.type == "cuda" and decode:
        bandwidth = measure_copy_bandwidth(device, nbytes=min(1 << 30, torch.cuda.mem_get_info()[0] // 4))
        weights = weight_bytes(llm.engine.executor.runner.model)
        kv_per_token = kv_bytes_per_token(llm.config.model_config)
        result.extra.update(roofline_summary(decode, weights, kv_per_token, bandwidth))
    del llm, recorder
    free_memory(device)
    return result


# ------------------------------------------------------------------------------------------- baselines


def build_hf_model(model_path: Path, device: torch.device, dtype: torch.dtype, attn: str) -> Any:
    """transformers' model for the same config, random weights, in the engine's dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model.eval()


def _supported_kwargs(fn: Callable[..., Any], **kwargs: Any) -> dict[str, Any]:
    """Only the keyword arguments this transformers version's `fn` accepts (the API moves between releases)."""
    names = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in names}


def _greedy_config(max_new_tokens: int, **extra: Any) -> Any:
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0, **extra)


def _generate_batch_run(
    model: Any, config: Any, kwargs: dict[str, Any], workload: Workload, device: torch.device, variant: int
) -> tuple[float, int]:
    # No inference_mode here: generate_batch runs the model in a background thread (under no_grad), which
    # cannot update cache tensors created in inference mode.
    synchronize(device)
    start = time.perf_counter()
    results = model.generate_batch(inputs=workload.prompts(variant), generation_config=config, **kwargs)
    synchronize(device)
    wall = time.perf_counter() - start
    errors = [r.error for r in results.values() if r.error is not None]
    if errors or len(results) < len(workload.lengths):
        lost = len(workload.lengths) - len(results) + len(errors)
        print(f"generate_batch lost or failed {lost} requests; first error: {errors[:1]}", file=sys.stderr)
    return wall, sum(len(r.generated_tokens) for r in results.values() if r.error is None)


def run_generate_batch(
    args: argparse.Namespace, model_path: Path, device: torch.device, dtype: torch.dtype, workload: Workload
) -> RunResult:
    """transformers' continuous batching (`generate_batch`) with paged attention over sdpa.

    `generate_batch` sizes its paged cache from the workload (longest prompt, max_new_tokens, number of
    requests) and warms up (CUDA graphs / compile / a largest-size forward) on every call unless its manager
    persists: with `persistent_manager=True` the cold run pays that once and the timed runs reuse the warmed
    manager, as the engine's timed runs reuse its warmed engine."""
    model = build_hf_model(model_path, device, dtype, "paged|sdpa")
    config = _greedy_config(workload.output_len)
    kwargs = _supported_kwargs(model.generate_batch, progress_bar=False, persistent_manager=True)
    run = partial(_generate_batch_run, model, config, kwargs, workload, device)
    result = measure("transformers generate_batch (paged|sdpa)", workload, args.repeats, run)
    if hasattr(model, "destroy_cached_continuous_batching_manager"):
        model.destroy_cached_continuous_batching_manager()
    del model, run
    free_memory(device)
    return result


def _left_padded(batch: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for row, p in enumerate(batch):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _static_generate(model: Any, batch: list[list[int]], output_len: int, device: torch.device,
                     adapter_names: list[str] | None = None) -> int:
    """One padded batch; returns the number of tokens generated (all rows run to output_len). `adapter_names`:
    each row's peft adapter ("__base__": none), for a PeftModel."""
    ids, mask = _left_padded(batch, device)
    config = _greedy_config(output_len, min_new_tokens=output_len)
    extra = {"adapter_names": adapter_names} if any(n != "__base__" for n in adapter_names or ()) else {}
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, **extra)
    return (out.shape[1] - ids.shape[1]) * out.shape[0]


@torch.inference_mode()
def static_run(model: Any, size: int, workload: Workload, device: torch.device, variant: int,
               adapter_names: list[str] | None = None) -> tuple[float, int]:
    """Time `generate` over the workload's prompts in padded batches of `size` (rows' adapters by prompt index)."""
    prompts = workload.prompts(variant)
    synchronize(device)
    start = time.perf_counter()
    produced = sum(
        _static_generate(model, prompts[i : i + size], workload.output_len, device,
                         adapter_names[i : i + size] if adapter_names else None)
        for i in range(0, len(prompts), size)
    )
    synchronize(device)
    return time.perf_counter() - start, produced


def run_static(
    args: argparse.Namespace, model_path: Path, device: torch.device, dtype: torch.dtype, workload: Workload
) -> RunResult:
    """Plain `generate` over padded batches of --baseline-batch-size, in the prompts' order."""
    model = build_hf_model(model_path, device, dtype, "sdpa")
    size = args.baseline_batch_size
    run = partial(static_run, model, size, workload, device)
    result = measure(f"transformers generate (static, batch {size}, sdpa)", workload, args.repeats, run)
    del model, run
    free_memory(device)
    return result


# ------------------------------------------------------------------------------------------------ report


def describe_workload(args: argparse.Namespace, workload: Workload) -> str:
    """The report's one-line summary of the offline workload."""
    return (
        f"{args.num_prompts} prompts of {args.input_len_min}-{args.input_len_max} tokens "
        f"({workload.prompt_tokens} in all), {args.output_len} output tokens each, greedy, EOS ignored"
    )


def format_table(results: list[RunResult]) -> str:
    header = ["system", "output tok/s", "total tok/s", "wall s", "req/s", "output tokens"]
    rows = [
        [
            r.name,
            f"{r.output_tps:,.1f}",
            f"{r.total_tps:,.1f}",
            f"{r.wall_s:.3f}",
            f"{r.rps:.2f}",
            f"{r.output_tokens}/{r.expected_output_tokens}",
        ]
        for r in results
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def print_report(env: dict[str, str], workload: dict[str, str], results: list[RunResult]) -> None:
    for key, value in {**env, **workload}.items():
        print(f"{key:>28}: {value}")
    print()
    print(format_table(results))
    print()
    engine = results[0]
    for key, value in engine.extra.items():
        print(f"{key:>28}: {value}")
    for other in results[1:]:
        for key, value in other.extra.items():
            print(f"{key:>28}: {value} ({other.name})")
        ratio = f"{engine.output_tps / other.output_tps:.2f}x" if other.output_tokens else "n/a (no output)"
        print(f"{'ratio (output tok/s)':>28}: loomserve / {other.name} = {ratio}")


# -------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv), argv)


def run(args: argparse.Namespace, argv: list[str] | None,
        weight_bytes: Callable[[torch.nn.Module], StepWeightBytes] = dense_weight_bytes) -> int:
    """The benchmark of `args`: the engine, then the baseline, then the report; `weight_bytes` says what a decode
    step reads of the model's weights (the bandwidth floor)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model_path, load_format = resolve_model(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    workload = Workload.sample(args, prompt_vocab_size(model_path))

    results = [run_engine(args, model_path, load_format, workload, weight_bytes)]
    if args.threads:  # the engine set its own (and changes them step by step): the baseline gets what was asked
        torch.set_num_threads(args.threads)
    if args.baseline == "generate_batch":
        results.append(run_generate_batch(args, model_path, device, dtype, workload))
    elif args.baseline == "static":
        results.append(run_static(args, model_path, device, dtype, workload))

    description = {
        "model": f"{args.model} ({load_format})" if args.model else f"--shape {args.shape} (dummy weights)",
        "dtype": str(dtype).removeprefix("torch."),
        "workload": describe_workload(args, workload),
        "timing": f"per system: one untimed cold run, then the best of {args.repeats} timed run(s)",
        "command": command_line(argv),
    }
    print_report(environment(device), description, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

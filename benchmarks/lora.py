"""Multi-LoRA throughput: loomserve with the base model alone and with 1, 8, 64 distinct rank-16 adapters
spread over the requests, against peft's mixed-adapter batches (`generate(adapter_names=...)`) in
transformers on the same workload, in the same run.

What it measures
----------------
N requests of random prompt token ids (lengths uniform in [--input-len-min, --input-len-max], fixed seed),
each generating exactly --output-len tokens greedily with EOS ignored; request i uses adapter i mod K (K from
--adapters; 0 = the base model, LoRA off). Adapters are PEFT folders with random weights (rank --rank, every
linear projection of every layer: q, k, v, o, gate, up, down), written once into a cache folder. The clock
runs from submission of all requests to the last output; model load, adapter loads and warm-up (one request
per adapter first, so the timed runs find every adapter in its slot, then one untimed run of the same
lengths) are excluded; the fastest of --repeats timed runs on fresh token ids is reported. The engine runs with
`max_loras = max_cpu_loras = K`. peft runs the same requests in padded batches of --baseline-batch-size with
`adapter_names` naming each row's adapter ("__base__" rows: none), after loading the K adapters into one
PeftModel. Reported per K: output tokens/s, total tokens/s, wall time, and the ratio to the same system's
base-only throughput (the GPU target: 64 adapters at >= 0.75 of base-only for loomserve).

    python -m benchmarks.lora --shape tiny --num-prompts 64 --input-len-min 16 --input-len-max 64 --output-len 32
    python -m benchmarks.lora --shape qwen2.5-0.5b --num-prompts 256 --input-len-min 100 --input-len-max 512 \
        --output-len 128
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import PRESETS, build_preset_checkpoint, command_line, environment, prompt_vocab_size
from benchmarks.throughput import (
    RunResult,
    StepRecorder,
    Workload,
    add_engine_flags,
    add_workload_flags,
    build_hf_model,
    describe_workload,
    engine_kwargs,
    format_table,
    free_memory,
    measure,
    measure_engine,
    static_run,
    synchronize,
)
from loomserve.platform.config import resolve_device, resolve_dtype
from loomserve.platform.models.decoder import head_dim_of

ADAPTER_FORMAT_VERSION = 1
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", choices=sorted(PRESETS), default="tiny", help="model shape preset (dummy weights)")
    p.add_argument("--adapters", type=int, nargs="+", default=[0, 1, 8, 64], help="distinct adapters per case")
    p.add_argument("--rank", type=int, default=16)
    add_workload_flags(p, input_len=(16, 64), output_len=32)
    add_engine_flags(p)
    p.add_argument("--baseline", choices=["peft", "none"], default="peft")
    p.add_argument("--baseline-batch-size", type=int, default=64, help="batch size of the peft baseline")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per case; the fastest is reported")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if max(args.adapters) > args.num_prompts:
        p.error("--num-prompts must be at least the largest --adapters, so every adapter gets requests")
    return args


# --------------------------------------------------------------------------------------------- adapters


def projection_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """(in, out) features of each adapted projection of one decoder layer."""
    head_dim = head_dim_of(config)
    hidden, inter = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}


def make_adapters(model_path: Path, count: int, rank: int, dtype: torch.dtype, seed: int) -> list[Path]:
    """`count` PEFT adapter folders with random weights (N(0, 0.02), like the dummy base), cached on disk."""
    from loomserve.testing.cache import cached_build

    key = [ADAPTER_FORMAT_VERSION, str(model_path), rank, str(dtype), seed]
    return [cached_build(f"lora-adapter-{i}", [*key, i], partial(_write_adapter, model_path, rank, dtype, seed, i))
            for i in range(count)]


def _write_adapter(model_path: Path, rank: int, dtype: torch.dtype, seed: int, index: int, folder: Path) -> None:
    """Adapter `index`'s weights and adapter_config.json into `folder`."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path).get_text_config()
    shapes = projection_shapes(config)
    g = torch.Generator().manual_seed(seed * 100_003 + index)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for name in TARGETS:
            module = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{module}.{name}"
            n_in, n_out = shapes[name]
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, n_in, generator=g) * 0.02).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(n_out, rank, generator=g) * 0.02).to(dtype)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model_path),
        "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS), "lora_dropout": 0.0,
        "bias": "none", "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "fan_in_fan_out": False, "inference_mode": True,
    }))


def adapter_of(request_index: int, num_adapters: int) -> int | None:
    return None if num_adapters == 0 else request_index % num_adapters


# ----------------------------------------------------------------------------------------------- engine


def run_engine(args: argparse.Namespace, model_path: Path, workload: Workload, adapters: list[Path]) -> RunResult:
    from loomserve import LLM, LoRARequest, SamplingParams

    k = len(adapters)
    lora_kwargs = {"enable_lora": True, "max_loras": k, "max_cpu_loras": k, "max_lora_rank": args.rank} if k else {}
    llm = LLM(str(model_path), **engine_kwargs(args, "dummy"), **lora_kwargs)
    device = llm.config.model_config.device
    loras = [LoRARequest(f"adapter-{i}", i + 1, str(path)) for i, path in enumerate(adapters)]
    requests = [None if (j := adapter_of(i, k)) is None else loras[j] for i in range(len(workload.lengths))]
    warm = workload.warmup_prompts(max(k, 4))
    short = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in warm], short,
                 lora_request=[loras[i % k] if k else None for i in range(len(warm))])
    synchronize(device)
    recorder = StepRecorder(llm.engine, device)
    backend = llm.engine.executor.runner.hook("lora").manager.state.backend if k else "-"
    result = measure_engine(f"loomserve, {k} adapters", llm, recorder, workload, args.repeats,
                            {"LoRA kernels": backend}, lora_request=requests)
    del llm, recorder
    free_memory(device)
    return result


# ------------------------------------------------------------------------------------------------- peft


def load_peft_model(model_path: Path, device: torch.device, dtype: torch.dtype, adapters: list[Path]) -> Any:
    """transformers' model of the same config; with adapters, one PeftModel holding all of them (a0, a1, ...)."""
    model = build_hf_model(model_path, device, dtype, "sdpa")
    if not adapters:
        return model
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="a0", torch_device=str(device))
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(str(path), adapter_name=f"a{i}", torch_device=str(device))
    return model.to(dtype).eval()


def run_peft(args: argparse.Namespace, model_path: Path, device: torch.device, dtype: torch.dtype,
             workload: Workload, adapters: list[Path]) -> RunResult:
    """transformers `generate` over padded batches of --baseline-batch-size, each row naming its adapter."""
    k = len(adapters)
    load_start = time.perf_counter()
    model = load_peft_model(model_path, device, dtype, adapters)
    load_s = time.perf_counter() - load_start
    names = ["__base__" if (j := adapter_of(i, k)) is None else f"a{j}" for i in range(len(workload.lengths))]
    size = args.baseline_batch_size
    run = partial(static_run, model, size, workload, device, adapter_names=names)
    extra = {"adapter loading": f"{load_s:.1f} s"} if k else {}
    result = measure(f"peft (adapter_names), {k} adapters, batch {size}", workload, args.repeats, run, extra)
    del model, run
    free_memory(device)
    return result


# ------------------------------------------------------------------------------------------------ report


def ratio_table(results: dict[str, dict[int, RunResult]]) -> str:
    lines = ["| system | adapters | output tok/s | vs base-only |", "|---|---|---|---|"]
    for system, by_k in results.items():
        base = by_k.get(0)
        for k, r in by_k.items():
            ratio = f"{r.output_tps / base.output_tps:.2f}" if base else "-"
            lines.append(f"| {system} | {k} | {r.output_tps:,.1f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_path = build_preset_checkpoint(args.shape)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    workload = Workload.sample(args, prompt_vocab_size(model_path))
    all_adapters = make_adapters(model_path, max(args.adapters), args.rank, dtype, args.seed)

    results: dict[str, dict[int, RunResult]] = {"loomserve": {}, "peft": {}}
    for k in args.adapters:
        results["loomserve"][k] = run_engine(args, model_path, workload, all_adapters[:k])
        print(f"loomserve, {k} adapters: {results['loomserve'][k].output_tps:,.1f} output tok/s", file=sys.stderr)
    if args.baseline == "peft":
        for k in args.adapters:
            results["peft"][k] = run_peft(args, model_path, device, dtype, workload, all_adapters[:k])
            print(f"peft, {k} adapters: {results['peft'][k].output_tps:,.1f} output tok/s", file=sys.stderr)
    else:
        del results["peft"]

    description = {
        "model": f"--shape {args.shape} (dummy weights)",
        "dtype": str(dtype).removeprefix("torch."),
        "adapters": f"rank {args.rank} on {', '.join(TARGETS)} of every layer; request i uses adapter i mod K",
        "workload": describe_workload(args, workload),
        "timing": f"best of {args.repeats} timed run(s) per case" if args.repeats > 1 else "one timed run per case",
        "command": command_line(argv),
    }
    for key, value in {**environment(device), **description}.items():
        print(f"{key:>28}: {value}")
    flat = [r for by_k in results.values() for r in by_k.values()]
    print()
    print(format_table(flat))
    print()
    print(ratio_table(results))
    print()
    for r in flat:
        for key, value in r.extra.items():
            print(f"{key:>28}: {value} ({r.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

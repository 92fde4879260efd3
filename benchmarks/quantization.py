"""Quantized base weights (and KV caches) against bf16: offline throughput, small-batch decode speed and weight memory
per format.

What it measures
----------------
For each format of --formats (bf16: the dense weights; fp8: FP8 W8A8 quantized at load, per-channel weight scales
and per-token activation scales, `torch._scaled_mm` on Hopper; int4: a GPTQ checkpoint of random 4-bit weights,
group size 128, written once into the cache for the --shape preset, served by the Triton INT4 kernel at small
batches) one engine is built on random weights (`--shape` preset, `load_format="dummy"`, or `--model PATH`), then:

- throughput: --num-prompts requests of random prompt ids ([--input-len-min, --input-len-max] tokens) each
  generating --output-len tokens greedily, EOS ignored, all submitted at once (`benchmarks.throughput`'s workload
  and timing: one untimed cold run, then --repeats timed runs on fresh ids, the fastest reported): output tok/s;
- decode: for each batch size of --decode-batches, that many --decode-prompt-len-token prompts (32; long contexts
  show what the KV cache's bytes cost) generating --decode-len tokens; the engine's pure-decode steps are timed
  (`StepRecorder`): decode tok/s = sequences per step / mean step time;
- memory: bytes of the model's parameters (the quantized weights and their scales), and the KV blocks the engine's
  pool holds.

Each format runs once per KV-cache dtype of --kv-cache-dtypes (auto: the model's; fp8: float8 keys and values, half
the bytes, so about twice the blocks). The table gives each run's numbers and its ratio to the first.

    python -m benchmarks.quantization --device cuda --shape qwen3-8b --formats bf16,fp8
    python -m benchmarks.quantization --device cuda --shape qwen3-8b --formats bf16 --kv-cache-dtypes auto,fp8 \
        --num-prompts 64 --decode-prompt-len 8192 --decode-batches 1,32
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    add_model_flags,
    command_line,
    environment,
    markdown_table,
    prompt_vocab_size,
    resolve_model,
)
from benchmarks.throughput import (
    StepRecorder,
    Workload,
    add_engine_flags,
    add_workload_flags,
    describe_workload,
    engine_kwargs,
    free_memory,
    measure_engine,
    synchronize,
)
from loomserve.testing.cache import cached_build

FORMATS = {"bf16": None, "fp8": "fp8", "int4": None}  # format -> --quantization of the dense checkpoint
INT4_GROUP = 128


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_model_flags(p, "engine load_format")
    add_workload_flags(p, input_len=(100, 1024), output_len=256)
    add_engine_flags(p)
    p.set_defaults(num_prompts=256, shape="qwen3-8b")
    p.add_argument("--formats", default="bf16,fp8",
                   help=f"comma-separated, the first is the baseline: {', '.join(FORMATS)}")
    p.add_argument("--decode-batches", default="1,8", help="batch sizes of the decode measurement")
    p.add_argument("--decode-len", type=int, default=128, help="tokens each decode-measurement request generates")
    p.add_argument("--decode-prompt-len", type=int, default=32, help="prompt tokens of each decode-measurement "
                   "request: the context the decodes attend over")
    p.add_argument("--kv-cache-dtypes", default="auto",
                   help="comma-separated KV-cache dtypes each format runs with: auto, fp8, fp8_e4m3, fp8_e5m2")
    p.add_argument("--repeats", type=int, default=1, help="timed throughput runs per format; the fastest counts")
    args = p.parse_args(argv)
    args.formats = args.formats.split(",")
    unknown = [f for f in args.formats if f not in FORMATS]
    if unknown:
        p.error(f"unknown formats {unknown}; choose from {', '.join(FORMATS)}")
    args.decode_batches = [int(b) for b in args.decode_batches.split(",")]
    args.kv_cache_dtypes = args.kv_cache_dtypes.split(",")
    return args


@dataclass
class FormatResult:
    name: str  # the format, and the KV-cache dtype where it is not auto
    weight_bytes: int
    kv_blocks: int
    output_tps: float
    decode_tps: dict[int, float]  # batch size -> decode tokens/s


def decode_tps(llm: Any, recorder: StepRecorder, batch: int, args: argparse.Namespace, vocab: int) -> float:
    """Sequences per pure-decode step over the mean step time, `batch` requests decoding together."""
    from loomserve import SamplingParams

    rng = np.random.default_rng([args.seed, batch])
    prompts = [{"prompt_token_ids": rng.integers(0, vocab, args.decode_prompt_len).tolist()} for _ in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=args.decode_len, ignore_eos=True)
    llm.generate(prompts, params)  # cold: CUDA graphs and kernels of this batch size
    recorder.records, recorder.enabled = [], True
    llm.generate(prompts, params)
    recorder.enabled = False
    decode = recorder.decode_steps()
    return sum(r.num_seqs for r in decode) / sum(r.seconds for r in decode)


def run_format(args: argparse.Namespace, name: str, kv_cache_dtype: str, model_path: Path, load_format: str,
               workload: Workload, vocab: int) -> FormatResult:
    from loomserve import LLM

    if name == "int4":
        model_path, load_format = random_gptq_checkpoint(model_path), "auto"
    llm = LLM(str(model_path), quantization=FORMATS[name], kv_cache_dtype=kv_cache_dtype,
              **engine_kwargs(args, load_format))
    device = llm.config.model_config.device
    model = llm.engine.executor.runner.model
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    recorder = StepRecorder(llm.engine, device)
    kv_blocks = llm.engine.scheduler.kv.pool.num_blocks
    label = name if kv_cache_dtype == "auto" else f"{name}, kv {kv_cache_dtype}"
    throughput = measure_engine(label, llm, recorder, workload, args.repeats)
    decode = {b: decode_tps(llm, recorder, b, args, vocab) for b in args.decode_batches}
    synchronize(device)
    del llm, recorder, model
    free_memory(device)
    return FormatResult(label, weight_bytes, kv_blocks, throughput.output_tps, decode)


def random_gptq_checkpoint(preset_folder: Path) -> Path:
    """The preset (config, tokenizer) with random weights, its decoder linears as GPTQ 4-bit tensors (v1 format),
    built once into the cache."""
    return cached_build("gptq-random", [2, str(preset_folder), INT4_GROUP], partial(_write_gptq, preset_folder))


def _write_gptq(preset_folder: Path, folder: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(preset_folder)
    with torch.device("meta"):
        names = {n: tuple(p.shape) for n, p in AutoModelForCausalLM.from_config(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in names.items():
        if ".layers." in name and name.endswith("proj.weight") and len(shape) == 2:
            out_features, in_features = shape
            base, groups = name.removesuffix(".weight"), -(-in_features // INT4_GROUP)
            random_int32 = lambda *size: torch.randint(-2**31, 2**31, size, generator=generator, dtype=torch.int64)
            tensors[f"{base}.qweight"] = random_int32(in_features // 8, out_features).to(torch.int32)
            tensors[f"{base}.qzeros"] = random_int32(groups, out_features // 8).to(torch.int32)
            tensors[f"{base}.scales"] = torch.full((groups, out_features), 0.002, dtype=torch.float16)
        elif name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    for path in preset_folder.iterdir():
        shutil.copy(path, folder / path.name)
    config_json = json.loads((folder / "config.json").read_text())
    config_json["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": INT4_GROUP,
                                          "desc_act": False, "sym": True, "checkpoint_format": "gptq"}
    (folder / "config.json").write_text(json.dumps(config_json, indent=2))


def format_table(results: list[FormatResult]) -> str:
    base = results[0]
    batches = list(base.decode_tps)
    header = ["format", "weights GiB", "KV blocks", "output tok/s", f"vs {base.name}",
              *(f"decode tok/s b={b} (vs {base.name})" for b in batches)]
    rows = [[r.name, f"{r.weight_bytes / 2**30:.2f}", f"{r.kv_blocks:,}", f"{r.output_tps:,.0f}",
             f"{r.output_tps / base.output_tps:.2f}x",
             *(f"{r.decode_tps[b]:,.1f} ({r.decode_tps[b] / base.decode_tps[b]:.2f}x)" for b in batches)]
            for r in results]
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    from loomserve.platform.config import resolve_device

    args = parse_args(argv)
    model_path, load_format = resolve_model(args)
    vocab = prompt_vocab_size(model_path)
    workload = Workload.sample(args, vocab)
    results = [run_format(args, name, kv, model_path, load_format, workload, vocab)
               for name in args.formats for kv in args.kv_cache_dtypes]
    described = {
        **environment(resolve_device(args.device)),
        "model": f"{args.model or args.shape} ({load_format} weights)",
        "workload": describe_workload(args, workload),
        "decode": f"batches {args.decode_batches} of {args.decode_prompt_len}-token prompts, {args.decode_len} "
                  "tokens each",
        "command": command_line(argv),
    }
    for key, value in described.items():
        print(f"{key:>20}: {value}")
    print()
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

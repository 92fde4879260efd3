"""argparse flags from EngineArgs' fields: name, type, default, help and choices come from the field, so the CLI
keeps no second list of them. Flags are grouped as `vllm serve --help` groups them; a field no group names lands in
"Engine"."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Any

from loomserve.platform.config import EngineArgs

GROUPS: dict[str, tuple[str, ...]] = {
    "ModelConfig": ("model", "tokenizer", "revision", "trust_remote_code", "served_model_name", "dtype",
                    "max_model_len", "max_logprobs", "generation_config", "seed", "task", "pooler_config",
                    "hf_overrides", "quantization", "enforce_eager", "max_cudagraph_capture_size",
                    "enable_prompt_embeds", "skip_tokenizer_init"),
    "LoadConfig": ("load_format", "download_dir"),
    "DeviceConfig": ("device", "cpu_threads", "attention_backend"),
    "CacheConfig": ("block_size", "kv_cache_memory", "kv_cache_dtype", "calculate_kv_scales",
                    "gpu_memory_utilization", "num_gpu_blocks_override", "enable_prefix_caching"),
    "SchedulerConfig": ("max_num_batched_tokens", "max_num_seqs", "enable_chunked_prefill", "async_scheduling"),
    "ParallelConfig": ("tensor_parallel_size", "data_parallel_size", "pipeline_parallel_size",
                       "distributed_executor_backend", "enable_expert_parallel", "nnodes", "node_rank",
                       "master_addr", "master_port"),
    "LoRAConfig": ("enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras"),
    "MultiModalConfig": ("limit_mm_per_prompt", "allowed_media_domains", "allowed_local_media_path",
                         "max_image_pixels", "encoder_cache_memory", "media_io_kwargs",
                         "mm_processor_cache_gb", "enable_mm_embeds"),
    "SpeculativeConfig": ("speculative_config",),
}
SHORT_FLAGS = {"tensor_parallel_size": "-tp", "data_parallel_size": "-dp", "pipeline_parallel_size": "-pp"}


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineArgs field (`max_num_seqs` -> `--max-num-seqs`, some with vLLM's short form), in its
    group; the required `model` is positional and optional, None when left out."""
    hints = typing.get_type_hints(EngineArgs)
    groups = {name: parser.add_argument_group(name) for name in (*GROUPS, "Engine")}
    group_of = {field: group for group, fields in GROUPS.items() for field in fields}
    for f in dataclasses.fields(EngineArgs):
        kwargs = {"help": f.metadata["help"], **_type_kwargs(hints[f.name]),
                  **{k: v for k, v in f.metadata.items() if k != "help"}}
        group = groups[group_of.get(f.name, "Engine")]
        if f.default is dataclasses.MISSING:
            group.add_argument(f.name, nargs="?", default=None, **kwargs)
        else:
            names = ["--" + f.name.replace("_", "-"), *([SHORT_FLAGS[f.name]] if f.name in SHORT_FLAGS else [])]
            group.add_argument(*names, default=f.default, **kwargs)
    groups["ParallelConfig"].add_argument(
        "--headless", action="store_true",
        help="run only this node's tensor-parallel ranks (nnodes > 1, node_rank > 0): no engine, no HTTP server")


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    return EngineArgs(**{name: getattr(ns, name) for name in EngineArgs.field_names()})


def expand_dotted_flags(argv: list[str]) -> list[str]:
    """vLLM's dotted form of a JSON-object flag: `--pooler-config.task embed` or `--hf-overrides.is_matryoshka=true`
    sets one key (nested with more dots; a value is JSON when it parses, else text), merged over the flag's own JSON
    when that is given too."""
    hints = typing.get_type_hints(EngineArgs)
    json_flags = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(EngineArgs) if _takes_dict(hints[f.name])}
    dotted: dict[str, dict] = {}
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        flag, dot, path = arg.partition(".")
        if not (dot and flag in json_flags):
            out.append(arg)
            continue
        path, eq, value = path.partition("=")
        value = value if eq else next(args, "")
        target = dotted.setdefault(flag, {})
        *parents, last = path.split(".")
        for key in parents:
            target = target.setdefault(key, {})
        target[last] = _json_or_text(value)
    for flag, values in dotted.items():
        given = next((i for i, arg in enumerate(out) if arg == flag), None)
        if given is not None and given + 1 < len(out):
            out[given + 1] = json.dumps({**_json_or_text(out[given + 1]), **values})
        else:
            out += [flag, json.dumps(values)]
    return out


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _takes_dict(hint: Any) -> bool:
    kinds = typing.get_args(hint) if _is_union(hint) else (hint,)
    return any((typing.get_origin(k) or k) is dict for k in kinds)


def _type_kwargs(hint: Any) -> dict[str, Any]:
    """A field's type -> how argparse reads it. Fields that also take a dict or a memory size are read as text
    (JSON or "4GiB"), which EngineArgs parses itself; a field that takes one value or a list takes one or more."""
    kinds = set(typing.get_args(hint)) - {types.NoneType} if _is_union(hint) else {hint}
    origins = {typing.get_origin(k) or k for k in kinds}
    if list in origins:
        return {"nargs": "+"}
    if str in origins:
        return {}
    if origins == {bool}:
        return {"action": argparse.BooleanOptionalAction}
    if len(origins) == 1 and origins <= {int, float}:
        return {"type": origins.pop()}
    raise TypeError(f"no CLI flag type for an EngineArgs field of type {hint}")


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)

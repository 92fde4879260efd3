"""Checkpoint -> model: build the architecture's module on the target device and dtype, then fill it from
safetensors (one file, or shards listed by `model.safetensors.index.json`) or with seeded random weights
(`load_format="dummy"`, for benchmarks)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from loomserve.platform.config import ModelConfig
from loomserve.platform.distributed.parallel_state import get_tp_group
from loomserve.platform.models.interfaces import ServedModel, is_multimodal
from loomserve.platform.models.linear import CheckpointTensor
from loomserve.platform.models.packing import projection_names
from loomserve.platform.models.registry import get_model_class
from loomserve.platform.quantization.gguf import iterate_gguf
from loomserve.platform.quantization.kv_scales import load_kv_scales, split_kv_scales
from loomserve.platform.quantization.methods import apply_quantization, split_quantized

logger = logging.getLogger(__name__)

_INDEX = "model.safetensors.index.json"


def load_model(model_config: ModelConfig, attention_backend: str = "auto") -> ServedModel:
    start = time.perf_counter()
    model_cls = get_model_class(model_config.architecture, model_config.task)
    # Multimodal models take the whole config (towers and text); decoders and encoders take the text config.
    config = model_config.hf_config if is_multimodal(model_cls) else model_config.text_config
    with default_dtype(model_config.dtype), model_config.device:
        model = model_cls(config, attention_backend)
    quantization, hf_config = model_config.quantization, model_config.hf_config
    groups, kv_scales = None, {}
    if model_config.load_format == "dummy":
        loaded = init_dummy_weights(model, model_config.seed, model_config.text_config)
    else:
        weights = split_kv_scales(checkpoint_weights(model_config), kv_scales)
        groups, weights = split_quantized(weights, quantization, hf_config)
        loaded = model.load_weights(weights)
        load_kv_scales(model, kv_scales)
    loaded = apply_quantization(model, loaded, quantization, hf_config, groups)
    check_all_loaded(model, loaded)
    model.eval()
    num_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "%s: loaded %s (%s weights): %.1fM parameters, %s on %s in %.2f s",
        model_config.served_model_name,
        model_config.architecture,
        "dummy" if model_config.load_format == "dummy" else model_config.model,
        num_params / 1e6,
        model_config.dtype,
        model_config.device,
        time.perf_counter() - start,
    )
    return model


def checkpoint_weights(model_config: ModelConfig) -> Iterator[tuple[str, CheckpointTensor]]:
    """The checkpoint's (name, tensor) pairs: a GGUF file's dequantized, or safetensors (under tensor parallelism
    as lazy slices, so each rank reads only its shard)."""
    if model_config.gguf_file is not None:
        return iterate_gguf(Path(model_config.model) / model_config.gguf_file, model_config.hf_config)
    return iterate_safetensors(safetensors_files(model_config.model), lazy=get_tp_group().size > 1)


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly in `dtype` (no float32 copy first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def safetensors_files(model: str) -> list[Path]:
    """The weight files of a checkpoint folder (or a hub id, through the local hub cache or a download)."""
    folder = Path(model) if os.path.isdir(model) else _snapshot(model)
    index = folder / _INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {folder} (no model.safetensors, no {_INDEX})")
    return files


def _snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, allow_patterns=["*.json", "model*.safetensors"]))


def iterate_safetensors(files: list[Path], lazy: bool = False) -> Iterator[tuple[str, CheckpointTensor]]:
    """(name, tensor) for every tensor of every file, with a progress bar over tensors (on a terminal); `lazy`:
    safetensors slices instead, read from disk only where indexed (`linear.narrow`)."""
    total = 0
    for path in files:
        with safe_open(path, framework="pt") as f:
            total += len(f.keys())
    with tqdm(total=total, desc="Loading safetensors", unit="tensor", disable=None) as bar:
        for path in files:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_slice(name) if lazy else f.get_tensor(name)
                    bar.update()


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int, config: object) -> set[str]:
    """Random weights of the right shapes: norms at one, the rest N(0, initializer_range) from `seed`,
    small enough that activations stay finite in bf16."""
    std = getattr(config, "initializer_range", 0.02)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    names = set()
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, std, generator=generator)
        names.add(name)
    return names


def check_all_loaded(model: ServedModel, loaded: set[str]) -> None:
    missing = sorted({name for name, _ in model.named_parameters()} - loaded)
    if missing:
        names = ", ".join(_checkpoint_names(model, name) for name in missing)
        raise ValueError(f"the checkpoint lacks {len(missing)} weights: {names}")


def _checkpoint_names(model: ServedModel, param_name: str) -> str:
    """A parameter's name as the checkpoint spells it: fused ones name every projection they come from."""
    module, _, attr = param_name.rpartition(".")
    if "." not in module:  # a top-level module (lm_head) is never fused
        return param_name
    return " / ".join(f"{name}.{attr}" for name in projection_names(model, module))

"""Checkpoint projections and a model's fused layers: loading per-projection tensors into fused parameters,
and naming a fused layer's projections back (through the model's `packed_modules_mapping`)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable

import torch
from torch import nn

from loomserve.platform.models.interfaces import ServedModel
from loomserve.platform.models.linear import load_param


def load_packed_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    param_for: Callable[[str], tuple[str, Hashable | None] | None],
) -> set[str]:
    """Copy HF-named checkpoint tensors (whole, or lazy slices: `linear.narrow`) into `model`'s parameters.
    `param_for` maps a tensor's name to (parameter name, shard of a fused parameter or None), or None for tensors
    the model does not use (or another rank loads). A sharded parameter loads through its own `weight_loader`.
    Returns the names of parameters fully loaded (a fused parameter counts once all its shards are in)."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    shards: dict[str, set[int]] = defaultdict(set)
    for name, tensor in weights:
        target = param_for(name)
        if target is None:
            continue
        param_name, shard_id = target
        if param_name not in params:
            raise ValueError(f"checkpoint tensor {name!r} has no parameter in {type(model).__name__}")
        try:
            if shard_id is None:
                load_param(params[param_name], tensor)
                loaded.add(param_name)
                continue
            module = model.get_submodule(param_name.rsplit(".", 1)[0])
            module.load_shard(params[param_name], shard_id, tensor)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        shards[param_name].add(shard_id)
        if len(shards[param_name]) == module.num_shards(params[param_name]):
            loaded.add(param_name)
    return loaded


def projection_names(model: ServedModel, module_name: str) -> list[str]:
    """Checkpoint names of the projections a module computes, in output order: a fused
    `...self_attn.qkv_proj` gives `[...q_proj, ...k_proj, ...v_proj]`; any other module gives its own name."""
    parent, leaf = module_name.rsplit(".", 1)
    mapping = model.packed_modules_mapping
    shards = sorted((shard, part) for part, (fused, shard) in mapping.items() if fused == leaf)
    return [f"{parent}.{part}" for _, part in shards] or [module_name]


def decoder_linears(model: ServedModel, types: tuple[type[nn.Module], ...]) -> list[tuple[str, nn.Module]]:
    """(name, module) of each module of `types` inside the language model's decoder layers: what LoRA adapts
    and NF4 quantizes. A multimodal model's `language_model_prefix` leaves its towers and projector out."""
    prefix = model.language_model_prefix
    return [(name, m) for name, m in model.named_modules()
            if name.startswith(prefix) and ".layers." in name and isinstance(m, types)]

"""Fused layers back to the checkpoint's projections, through a model's `packed_modules_mapping`."""

from __future__ import annotations

from torch import nn


def projection_names(model: nn.Module, module_name: str) -> list[str]:
    """Checkpoint names of the projections a module computes, in output order: a fused
    `...self_attn.qkv_proj` gives `[...q_proj, ...k_proj, ...v_proj]`; any other module gives its own name."""
    parent, leaf = module_name.rsplit(".", 1)
    mapping = getattr(model, "packed_modules_mapping", {})
    shards = sorted((shard, part) for part, (fused, shard) in mapping.items() if fused == leaf)
    return [f"{parent}.{part}" for _, part in shards] or [module_name]

"""Quantized weights under tensor parallelism: which slice of each checkpoint projection a rank holds (the dense
tensor-parallel layer being replaced says: output rows of a column-parallel layer, input columns of a row-parallel
one), the cut of a method's quantized tensors to that slice, and the all-reduce a row-parallel layer keeps once
its weights are quantized.

Each method cuts its own tensors (`shard_group` in its module): the checkpoint tensors arrive whole or as lazy
safetensors slices, so a rank reads only its share from disk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from loomserve.platform.distributed.communication import all_reduce
from loomserve.platform.distributed.parallel_state import TPGroup
from loomserve.platform.models.linear import (
    CheckpointTensor,
    MergedColumnParallelLinear,
    RowParallelLinear,
    check_full,
    narrow,
)
from loomserve.platform.quantization.base import QuantizedLinear, TensorGroup


@dataclass(frozen=True)
class Shard:
    """This rank's slice of one checkpoint projection [out, in]: `size` output rows (`rows`, column-parallel) or
    input columns (not `rows`, row-parallel) from `start`, of `full`."""

    rows: bool
    start: int
    size: int
    full: int

    @property
    def end(self) -> int:
        return self.start + self.size

    def cut(self, loaded: CheckpointTensor, dim: int, unit: int = 1) -> torch.Tensor:
        """The slice of `loaded` along `dim`, whose entries each cover `unit` rows or columns (packed values,
        scale blocks or groups); a last partial unit is held by the rank ending the projection."""
        check_full(loaded, dim, -(-self.full // unit))
        return narrow(loaded, dim, self.start // unit, -(-self.end // unit) - self.start // unit)

    def check_units(self, unit: int, what: str) -> None:
        """Refuse a slice whose boundaries fall inside a `unit` (a scale block, a group, a packed word)."""
        if self.start % unit or (self.end % unit and self.end != self.full):
            side = "output rows" if self.rows else "input columns"
            raise ValueError(f"tensor parallelism splits a projection at {side} {self.start}..{self.end} of "
                             f"{self.full}, inside a {what} of {unit}: serve it with a tensor_parallel_size that "
                             f"splits at whole {what}s")


# A method's cut of one projection's quantized tensors to a rank's slice.
ShardGroup = Callable[[TensorGroup, Shard], TensorGroup]


def projection_shards(linear: nn.Linear) -> list[Shard] | None:
    """This rank's slice of each projection a dense tensor-parallel layer computes (None: it holds them whole)."""
    if isinstance(linear, MergedColumnParallelLinear) and linear.full_sizes != linear.output_sizes:
        return [Shard(True, start, size, full) for start, size, full
                in zip(linear.shard_starts, linear.output_sizes, linear.full_sizes, strict=True)]
    if isinstance(linear, RowParallelLinear) and linear.tp.size > 1:
        size = linear.in_features
        return [Shard(False, linear.tp.rank * size, size, size * linear.tp.size)]
    return None


def shard_groups(linear: nn.Linear, groups: list[TensorGroup], shard_group: ShardGroup | None) -> list[TensorGroup]:
    """Each projection's tensors cut to this rank's slice (read whole where the layer is not sharded)."""
    shards = projection_shards(linear)
    if shards is None:
        return [{part: whole(t) for part, t in g.items()} for g in groups]
    if shard_group is None:
        raise ValueError("this quantization method's checkpoints are not sharded across tensor-parallel ranks; "
                         "serve it with tensor_parallel_size 1")
    return [shard_group(g, s) for g, s in zip(groups, shards, strict=True)]


def whole(loaded: CheckpointTensor) -> torch.Tensor:
    """A tensor every rank holds whole (read from disk if lazy)."""
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]


class RowParallelQuantizedLinear(QuantizedLinear):
    """A row-parallel layer's quantized weights: the rank's input columns times its slice of the weights gives a
    partial output; the ranks' partials are summed (all-reduce), then the bias is added once."""

    def __init__(self, layer: QuantizedLinear, bias: torch.Tensor | None, tp: TPGroup) -> None:
        super().__init__(layer.in_features, layer.output_sizes, layer.compute_dtype)
        self.layer = layer
        layer.input_group = tp
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in / ranks] -> [T, out]
        return self.reduce(self.partial(x))

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of the output [T, out], before the sum over the ranks (a LoRA term may join it)."""
        return self.layer(x)

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        out = all_reduce(partial, self.tp)  # [T, out]
        return out if self.bias is None else out + self.bias


def build_sharded(linear: nn.Linear, build: Callable[[nn.Linear], QuantizedLinear]) -> QuantizedLinear:
    """`build(linear)`, keeping a column-parallel layer's slices (`full_sizes`, `shard_starts`: what an adapter is
    cut by), and for a row-parallel layer split across ranks the all-reduce around it: the quantized layer is built
    without the bias, which is added once after the sum."""
    if not (isinstance(linear, RowParallelLinear) and linear.tp.size > 1):
        layer = build(linear)
        if isinstance(linear, MergedColumnParallelLinear):  # an adapter's B rows are cut as these
            layer.full_sizes, layer.shard_starts = linear.full_sizes, linear.shard_starts
        return layer
    bias = linear.bias
    linear.bias = None
    try:
        layer = build(linear)
    finally:
        linear.bias = bias
    return RowParallelQuantizedLinear(layer, None if bias is None else bias.data.clone(), linear.tp)

"""LoRA under tensor parallelism: each rank holds its share of an adapter, sharded with its base layer (vLLM's
punica wrappers).

A column-parallel layer (q/k/v, gate/up) splits its output rows: A stays whole, B keeps the rows the rank's base
weight holds, so the rank's output rows come out whole. A row-parallel layer (o_proj, down_proj) splits its input
columns: A keeps the rank's columns, B stays whole, and the rank's LoRA term is a partial sum, added to the base
layer's partial output before the one all-reduce, which so sums both. Adapters are checked against the projections'
full (checkpoint) sizes and read whole on every rank; `shard_weights` cuts them when they go into a slot.
"""

from __future__ import annotations

from torch import nn

from loomserve.adapters.lora import LoRAWeights
from loomserve.platform.models.linear import MergedColumnParallelLinear, RowParallelLinear
from loomserve.platform.quantization.tensor_parallel import RowParallelQuantizedLinear


def full_in_features(base: nn.Module) -> int:
    """The input size of the projection as the checkpoint (and an adapter) has it."""
    if isinstance(base, (RowParallelLinear, RowParallelQuantizedLinear)):
        return base.in_features * base.tp.size
    return base.in_features


def full_output_sizes(base: nn.Module, local_sizes: list[int]) -> list[int]:
    """Each slice's output size as the checkpoint (and an adapter) has it."""
    return list(base.full_sizes) if _is_column_parallel(base) else local_sizes


def is_row_parallel(base: nn.Module) -> bool:
    """Whether the layer sums its ranks' partial outputs (so the LoRA term must join that sum)."""
    return isinstance(base, (RowParallelLinear, RowParallelQuantizedLinear)) and base.tp.size > 1


def _is_column_parallel(base: nn.Module) -> bool:
    """A layer whose projections' rows are split across the ranks (dense, or quantized from such a layer)."""
    return isinstance(base, MergedColumnParallelLinear) or getattr(base, "shard_starts", None) is not None


def shard_weights(base: nn.Module, weights: dict[int, LoRAWeights]) -> dict[int, LoRAWeights]:
    """This rank's share of one layer's adapter weights (slice -> weights), cut as the base layer's weight is."""
    if _is_column_parallel(base):
        return {s: LoRAWeights(w.a, w.b.narrow(0, base.shard_starts[s], base.output_sizes[s]), w.scaling)
                for s, w in weights.items()}  # b: [rows of this rank, r]
    if is_row_parallel(base):
        columns = base.in_features
        return {s: LoRAWeights(w.a.narrow(1, base.tp.rank * columns, columns), w.b, w.scaling)
                for s, w in weights.items()}  # a: [r, columns of this rank]
    return weights

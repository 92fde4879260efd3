"""Tensor-parallel layers (vLLM's): each rank holds a slice of a layer and loads only that slice of the checkpoint.

Column-parallel layers (q/k/v, gate/up, the LM head) split their output rows; row-parallel ones (o_proj, down_proj)
split their input columns and sum the ranks' partial outputs (all-reduce); the vocab-parallel embedding splits the
vocabulary. In a group of one each is the plain layer it replaces, computing exactly the same thing.

A checkpoint tensor reaches a loader either whole (`torch.Tensor`) or as a lazy safetensors slice, of which only the
rank's rows or columns are read from disk (`narrow`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loomserve.platform.distributed.communication import all_gather, all_reduce
from loomserve.platform.distributed.parallel_state import TPGroup, divide, get_tp_group, kv_heads_per_rank
from loomserve.platform.models.layers import MergedLinear, copy_checked
from loomserve.platform.models.onednn import WeightPacking, packs

CheckpointTensor = Any  # torch.Tensor, or a safetensors slice (read on indexing)


def shape_of(loaded: CheckpointTensor) -> tuple[int, ...]:
    return tuple(loaded.shape) if isinstance(loaded, torch.Tensor) else tuple(loaded.get_shape())


def dtype_of(loaded: CheckpointTensor) -> torch.dtype:
    """The element type of a tensor or of a lazy safetensors slice (which names it as safetensors spells it)."""
    if isinstance(loaded, torch.Tensor):
        return loaded.dtype
    from safetensors.torch import _TYPES

    return _TYPES[loaded.get_dtype()]


def narrow(loaded: CheckpointTensor, dim: int, start: int, length: int) -> torch.Tensor:
    """`length` entries of `loaded` along `dim` from `start`; a lazy slice reads only those from disk."""
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, length)
    index = [slice(None)] * len(loaded.get_shape())
    index[dim] = slice(start, start + length)
    return loaded[tuple(index)]


def materialize(loaded: CheckpointTensor) -> torch.Tensor:
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]


def load_whole(param: nn.Parameter, loaded: CheckpointTensor) -> None:
    """The default loader: a replicated parameter takes the checkpoint tensor as it is."""
    copy_checked(param.data, materialize(loaded))


def load_param(param: nn.Parameter, loaded: CheckpointTensor) -> None:
    """Load through the parameter's own `weight_loader` (a sharded parameter), else whole."""
    getattr(param, "weight_loader", load_whole)(param, loaded)


def check_full(loaded: CheckpointTensor, dim: int, full: int) -> None:
    if shape_of(loaded)[dim] != full:
        raise ValueError(f"checkpoint tensor has shape {shape_of(loaded)}, expected {full} along dim {dim}")


def _shard_loader(dim: int, tp: TPGroup) -> Any:
    """A weight_loader reading the rank's equal share of `dim` (the checkpoint's size is the ranks' sum)."""

    def load(param: nn.Parameter, loaded: CheckpointTensor) -> None:
        local = param.shape[dim]
        check_full(loaded, dim, local * tp.size)
        copy_checked(param.data, narrow(loaded, dim, tp.rank * local, local))

    return load


class MergedColumnParallelLinear(MergedLinear):
    """Projections of one input stacked along the output dim (gate_up), each split across the ranks by rows."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool, tp: TPGroup | None = None) -> None:
        tp = tp or get_tp_group()
        local = [divide(size, tp.size, "a projection's output size") for size in output_sizes]
        self._init_shards(in_features, output_sizes, local, [tp.rank * n for n in local], bias)

    def _init_shards(
        self, in_features: int, full: list[int], local: list[int], starts: list[int], bias: bool
    ) -> None:
        super().__init__(in_features, local, bias)
        self.full_sizes = full  # each projection's rows in the checkpoint
        self.shard_starts = starts  # the first checkpoint row of this rank's slice, per projection

    def load_shard(self, param: nn.Parameter, shard_id: int, tensor: CheckpointTensor) -> None:
        check_full(tensor, 0, self.full_sizes[shard_id])
        rows = narrow(tensor, 0, self.shard_starts[shard_id], self.output_sizes[shard_id])
        super().load_shard(param, shard_id, rows)


class QKVParallelLinear(MergedColumnParallelLinear):
    """q/k/v of one input, split by heads: each rank gets num_heads / N query heads and its share of the KV heads,
    or one KV head shared with its neighbours when N exceeds them (KV heads replicated)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 tp: TPGroup | None = None) -> None:
        tp = tp or get_tp_group()
        local_heads = divide(num_heads, tp.size, "num_attention_heads")
        local_kv = kv_heads_per_rank(num_kv_heads, tp.size)
        kv_start = tp.rank * num_kv_heads // tp.size * head_dim  # replicated: rank r reads head r * Hkv // N
        full = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        local = [local_heads * head_dim, local_kv * head_dim, local_kv * head_dim]
        self._init_shards(hidden_size, full, local, [tp.rank * local[0], kv_start, kv_start], bias)


class RowParallelLinear(nn.Linear):
    """A linear split by input columns: each rank multiplies its slice of the input, the ranks' outputs are summed
    (all-reduce), then the bias is added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup | None = None) -> None:
        self.tp = tp or get_tp_group()
        super().__init__(divide(in_features, self.tp.size, "a row-parallel input size"), out_features, bias=bias)
        self.weight.weight_loader = _shard_loader(1, self.tp)
        self.packing = WeightPacking()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self._linear(x, self.bias)
        return self.reduce(self.partial(x))

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of the output [T, out], before the sum over the ranks (a LoRA term may join it)."""
        return self._linear(x, None)

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.packing.linear(x, self.weight, bias) if packs(x) else F.linear(x, self.weight, bias)

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The ranks' partial outputs summed (all-reduce), then the bias once."""
        out = all_reduce(partial, self.tp)  # [T, out]
        return out if self.bias is None else out + self.bias


def vocab_range(vocab_size: int, tp: TPGroup) -> tuple[int, int]:
    """This rank's [start, start + rows) of the vocabulary padded to a multiple of the ranks."""
    rows = -(-vocab_size // tp.size)
    return tp.rank * rows, rows


def _vocab_loader(vocab_size: int, tp: TPGroup) -> Any:
    def load(param: nn.Parameter, loaded: CheckpointTensor) -> None:
        check_full(loaded, 0, vocab_size)
        start, rows = vocab_range(vocab_size, tp)
        real = max(0, min(rows, vocab_size - start))  # the last rank's padding rows stay zero
        param.data.zero_()
        copy_checked(param.data[:real], narrow(loaded, 0, start, real))

    return load


class VocabParallelEmbedding(nn.Embedding):
    """Embedding rows split across ranks: a rank looks up the ids it holds, zero elsewhere; the sum is the lookup."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup | None = None) -> None:
        self.tp = tp or get_tp_group()
        self.start, rows = vocab_range(vocab_size, self.tp)
        super().__init__(rows, hidden_size)
        self.weight.weight_loader = _vocab_loader(vocab_size, self.tp)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(input_ids)
        local = input_ids - self.start
        held = (local >= 0) & (local < self.num_embeddings)
        out = super().forward(torch.where(held, local, 0)) * held.unsqueeze(-1)  # [T, hidden]
        return all_reduce(out, self.tp)


class ParallelLMHead(nn.Linear):
    """The LM head split by vocabulary rows; every rank ends with the whole vocabulary's logits (all-gather)."""

    def __init__(self, hidden_size: int, vocab_size: int, tp: TPGroup | None = None) -> None:
        self.tp = tp or get_tp_group()
        self.vocab_size = vocab_size
        super().__init__(hidden_size, vocab_range(vocab_size, self.tp)[1], bias=False)
        self.weight.weight_loader = _vocab_loader(vocab_size, self.tp)
        self.packing = WeightPacking()  # on CPU the head is most of a small decoder's decode step: packed, half of it

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # [N, vocab / ranks]
        logits = self.packing.linear(hidden, self.weight, None) if packs(hidden) else F.linear(hidden, self.weight)
        return all_gather(logits, self.tp)[:, : self.vocab_size]  # [N, vocab]


class ShardedRMSNorm(nn.Module):
    """RMSNorm over a vector whose entries are split across the ranks (OLMoE's query/key norms span all heads):
    each rank holds `size` entries from `start` of the `full_size` weight; the mean square is summed over the
    ranks. Entries held by several ranks (replicated KV heads) are counted as often on every entry, so the mean
    is still the full vector's."""

    def __init__(self, size: int, full_size: int, start: int, eps: float, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.tp = tp or get_tp_group()
        self.eps, self.start, self.full_size = eps, start, full_size
        self.weight = nn.Parameter(torch.ones(size))
        self.weight.weight_loader = self._load

    def _load(self, param: nn.Parameter, loaded: CheckpointTensor) -> None:
        check_full(loaded, 0, self.full_size)
        copy_checked(param.data, narrow(loaded, 0, self.start, param.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        square_sum = all_reduce(h.pow(2).sum(-1, keepdim=True), self.tp)  # [T, 1] over every rank's entries
        h = h * torch.rsqrt(square_sum / (x.shape[-1] * self.tp.size) + self.eps)
        return self.weight * h.to(x.dtype)

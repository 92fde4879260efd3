"""The interface every quantized linear layer offers the model (and LoRA on top of it), and the one way a method
swaps a model's decoder linears for its own: built from the dense layer's loaded weights (quantize at load) or from
the checkpoint's quantized tensors, one group per projection of a fused layer."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from loomserve.platform.distributed.parallel_state import TPGroup
from loomserve.platform.models.packing import decoder_linears, projection_names

# A checkpoint projection's quantized tensors by part name ("weight", "weight_scale", "qweight", ...).
TensorGroup = dict[str, torch.Tensor]


class QuantizedLinear(nn.Module):
    """Projections of one input (one, or q/k/v or gate/up fused), stored quantized: forward(x [T, in]) -> [T, out]
    in `compute_dtype`. `output_sizes` are the projections' rows in output order, as a fused dense layer's."""

    def __init__(self, in_features: int, output_sizes: list[int], compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features = in_features
        self.output_sizes = list(output_sizes)
        self.out_features = sum(output_sizes)
        self.compute_dtype = compute_dtype
        # The ranks whose inputs are the rest of each input row (a row-parallel layer), over which an activation
        # scale of the whole row is taken; None: this rank holds whole rows.
        self.input_group: TPGroup | None = None
        # A column-parallel layer's projections in the checkpoint (`MergedColumnParallelLinear`'s): their full rows
        # and this rank's first row of each; None: this rank holds them whole.
        self.full_sizes: list[int] | None = None
        self.shard_starts: list[int] | None = None


class DequantizedLinear(QuantizedLinear):
    """Projections stored packed, one shard each (a shard has `out_features` and `dequantize(dtype)` -> [out_i, in],
    float32 by default): their dequantized weights, in the compute dtype, make one GEMM."""

    def __init__(self, shards: list[nn.Module], bias: torch.Tensor | None, in_features: int,
                 compute_dtype: torch.dtype) -> None:
        super().__init__(in_features, [s.out_features for s in shards], compute_dtype)
        self.shards = nn.ModuleList(shards)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_shards(cls, linear: nn.Linear, shards: list[nn.Module]) -> DequantizedLinear:
        """Shards of the dense layer's projections (checked against its rows) and its loaded biases."""
        for (rows, _), shard in zip(split_rows(linear), shards, strict=True):
            if tuple(shard.dequantize().shape) != tuple(rows.shape):
                raise ValueError(f"quantized projection of shape {tuple(shard.dequantize().shape)}, expected "
                                 f"{tuple(rows.shape)}")
        bias = None if linear.bias is None else linear.bias.data.clone()
        return cls(shards, bias, linear.in_features, linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        weight = torch.cat([s.dequantize(x.dtype) for s in self.shards])  # [out, in], made in x's dtype: a
        # float32 copy of every weight each step would cost more memory traffic than the GEMM
        return F.linear(x, weight, self.bias)


def split_groups(weights: Iterable[tuple[str, torch.Tensor]], groups: dict[str, TensorGroup],
                 is_part: Callable[[str, torch.Tensor], bool]) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass dense tensors on; collect each `projection.part` tensor that `is_part(part, tensor)` into
    `groups[projection.weight][part]`."""
    for name, tensor in weights:
        base, _, part = name.rpartition(".")
        if is_part(part, tensor):
            groups.setdefault(f"{base}.weight", {})[part] = tensor
        else:
            yield name, tensor


def split_rows(linear: nn.Linear) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight rows, bias rows) per projection of a possibly fused dense layer."""
    sizes = list(getattr(linear, "output_sizes", [linear.out_features]))
    weights = linear.weight.data.split(sizes)
    biases = linear.bias.data.split(sizes) if linear.bias is not None else [None] * len(sizes)
    return list(zip(weights, biases))


@torch.no_grad()
def replace_decoder_linears(
    model: nn.Module,
    loaded: set[str],
    from_dense: Callable[[nn.Linear], nn.Module] | None,
    from_groups: Callable[[nn.Linear, list[TensorGroup]], nn.Module],
    groups: dict[str, TensorGroup] | None,
    shard_group: Callable[..., TensorGroup] | None = None,
) -> set[str]:
    """Make every linear of the language model's decoder layers quantized (towers stay dense): `from_dense` of its
    loaded dense weights (under tensor parallelism the rank's shard), or, for a quantized checkpoint (`groups`:
    checkpoint weight name -> its tensors), `from_groups` of its projections' groups cut to the rank's slice by
    `shard_group` (`tensor_parallel.py`) and the dense layer's loaded biases (`from_dense` None: a method that
    does not quantize at load, which needs `groups`). Returns `loaded` updated to the
    new parameter names; a layer whose weights are missing stays dense and unloaded, so the loader's completeness
    check names it."""
    # imported here: tensor_parallel.py builds on QuantizedLinear, defined above
    from loomserve.platform.quantization.tensor_parallel import build_sharded, shard_groups

    if groups is None and from_dense is None:
        raise ValueError("this quantization method loads only checkpoints saved in its format")
    loaded = set(loaded)
    for name, module in decoder_linears(model, (nn.Linear,)):
        own = {f"{name}.{p}" for p, _ in module.named_parameters()}
        if groups is None:
            if not own <= loaded:
                continue
            new = build_sharded(module, from_dense)
        else:
            keys = [f"{projection}.weight" for projection in projection_names(model, name)]
            if not (own - {f"{name}.weight"} <= loaded and all(k in groups for k in keys)):
                continue
            parts = shard_groups(module, [groups.pop(k) for k in keys], shard_group)
            new = build_sharded(module, lambda linear, parts=parts: from_groups(linear, parts))
        loaded -= own
        loaded |= {f"{name}.{p}" for p, _ in new.named_parameters()}
        parent, leaf = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), leaf, new)
    if groups:
        raise ValueError(f"quantized weights with no layer to hold them: {', '.join(sorted(groups))}")
    return loaded

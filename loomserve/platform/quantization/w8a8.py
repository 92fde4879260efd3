"""W8A8 linears, FP8 (float8 e4m3) or INT8 (symmetric): weights stored in 8 bits with per-tensor, per-channel or
block scales; activations quantized per token (dynamic), per 128-column group (dynamic, block checkpoints) or with a
calibrated static scale. On a CUDA GPU with FP8 tensor cores (Hopper, Ada) row-scaled FP8 layers run
`torch._scaled_mm`; anywhere else (and for INT8) the reference quantizes and dequantizes the activations the same
way and multiplies with the dequantized weights, which is what transformers (compressed-tensors) computes.

Where the layer fuses projections (q/k/v, gate/up), each projection keeps its own weight scales (a per-tensor scale
becomes its rows' scale) and a static activation scale, which the fused input shares, is the projections' largest.
The block-scaled `quant_method: fp8` format (DeepSeek, Qwen) names its block scales `weight_scale_inv`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loomserve.platform.distributed.communication import all_reduce_max
from loomserve.platform.models.layers import use_fused_kernels
from loomserve.platform.models.linear import RowParallelLinear, dtype_of, shape_of
from loomserve.platform.quantization.base import (
    QuantizedLinear,
    TensorGroup,
    replace_decoder_linears,
    split_groups,
    split_rows,
)
from loomserve.platform.quantization.tensor_parallel import Shard, whole

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
_SCALE_PARTS = ("weight_scale", "weight_scale_inv", "input_scale", "weight_zero_point", "input_zero_point")


@dataclass(frozen=True)
class NumberFormat:
    """An 8-bit number format: its dtype, the range values clamp to, and the absmax a scale maps onto (half the
    range's width, compressed-tensors' symmetric scale: 448 for FP8, 127.5 for INT8)."""

    dtype: torch.dtype
    low: float
    high: float
    integer: bool

    @property
    def half_range(self) -> float:
        return (self.high - self.low) / 2


FORMATS = {"fp8": NumberFormat(FP8, -FP8_MAX, FP8_MAX, integer=False),
           "int8": NumberFormat(torch.int8, -128, 127, integer=True)}


@dataclass(frozen=True)
class W8Scheme:
    """How one checkpoint's 8-bit linears are stored and scaled."""

    number: str = "fp8"  # fp8 | int8 (FORMATS)
    weight_block: tuple[int, int] | None = None  # (rows, cols) of a weight scale's block; None: one scale per row
    activations: str = "token"  # token | group (dynamic, `activation_group` columns) | static (checkpoint scale)
    activation_group: int = 128


def check_fp8_config(saved: dict[str, Any]) -> W8Scheme:
    """The scheme of a `quant_method: fp8` checkpoint: block-scaled (`weight_block_size`, dynamic per-group
    activations) or per-tensor (static or dynamic activations)."""
    block = saved.get("weight_block_size")
    activation = saved.get("activation_scheme", "dynamic")
    if activation not in ("dynamic", "static"):
        raise ValueError(f"fp8 activation_scheme {activation!r} is not supported; dynamic or static")
    if block is not None:
        if activation != "dynamic" or len(block) != 2:
            raise ValueError(f"block-scaled fp8 needs dynamic activations and a 2-D weight_block_size, got {saved}")
        return W8Scheme(weight_block=(int(block[0]), int(block[1])), activations="group",
                         activation_group=int(block[1]))
    return W8Scheme(activations="static" if activation == "static" else "token")


def split_w8(weights: Iterable[tuple[str, torch.Tensor]], groups: dict[str, TensorGroup]
             ) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass dense tensors on; collect each 8-bit weight and its scales into `groups[weight name]`."""
    return split_groups(weights, groups, lambda part, tensor: part in _SCALE_PARTS
                        or (part == "weight" and dtype_of(tensor) in (FP8, torch.int8)))


def shard_w8(group: TensorGroup, shard: Shard, scheme: W8Scheme) -> TensorGroup:
    """One projection's 8-bit tensors cut to a rank's slice: the weight's rows or columns; per-channel scales with
    the output rows (a row-parallel slice keeps each row's scale whole); block scales by whole blocks; per-tensor
    and activation scales whole."""
    dim = 0 if shard.rows else 1
    if scheme.activations == "group" and not shard.rows:
        shard.check_units(scheme.activation_group, "activation group")
    cut = {"weight": shard.cut(group["weight"], dim)}
    for part, tensor in group.items():
        if part == "weight":
            continue
        if part in ("weight_scale", "weight_scale_inv") and scheme.weight_block is not None:
            block = scheme.weight_block[dim]
            shard.check_units(block, "weight scale block")
            cut[part] = shard.cut(tensor, dim, block)
        elif shard.rows and part.startswith("weight_") and math.prod(shape_of(tensor)) > 1:  # one entry per output row
            cut[part] = shard.cut(tensor, 0)
        else:
            cut[part] = whole(tensor)
    return cut


def quantize(x: torch.Tensor, scale: torch.Tensor, number: str = "fp8") -> torch.Tensor:
    fmt = FORMATS[number]
    q = (x.float() / scale).clamp(fmt.low, fmt.high)
    return (q.round() if fmt.integer else q).to(fmt.dtype)


def absmax_scale(amax: torch.Tensor, number: str = "fp8") -> torch.Tensor:
    """The scale mapping |x| <= amax onto the format's range (compressed-tensors': amax / 448 for FP8, amax / 127.5
    for INT8; never zero)."""
    scale = amax.float() / FORMATS[number].half_range
    return torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)


class W8Linear(QuantizedLinear):
    """weight [out, in] FP8; weight_scale [out, 1] (row scales) or [out / br, in / bc] (block scales);
    input_scale [1] (static activations) or none."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor | None,
                 bias: torch.Tensor | None, output_sizes: list[int], scheme: W8Scheme,
                 compute_dtype: torch.dtype) -> None:
        super().__init__(weight.shape[1], output_sizes, compute_dtype)
        self.scheme = scheme
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = nn.Parameter(weight_scale.float(), requires_grad=False)
        self.input_scale = None if input_scale is None else nn.Parameter(input_scale.float(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_groups(cls, linear: nn.Linear, groups: list[TensorGroup], scheme: W8Scheme) -> W8Linear:
        """A checkpoint's projections (FP8 weight and scales each) and the dense layer's loaded biases."""
        rows = split_rows(linear)
        try:
            weights = [g["weight"] for g in groups]
            scales = [g["weight_scale"] if "weight_scale" in g else g["weight_scale_inv"] for g in groups]
        except KeyError as e:
            raise ValueError(f"an 8-bit projection of {linear.in_features} inputs lacks its {e.args[0]}") from None
        for (dense, _), weight in zip(rows, weights, strict=True):
            if tuple(weight.shape) != tuple(dense.shape):
                raise ValueError(f"8-bit weight of shape {tuple(weight.shape)}, expected {tuple(dense.shape)}")
        if scheme.weight_block is None:  # per-tensor ([] or [1]) or per-channel ([out_i, 1]) -> each row's scale
            scales = [s.float().reshape(-1, 1).expand(w.shape[0], 1) for s, w in zip(scales, weights)]
        elif any(w.shape[0] % scheme.weight_block[0] for w in weights[:-1]):
            raise ValueError(f"fused projections of {[w.shape[0] for w in weights]} rows do not split into "
                             f"{scheme.weight_block[0]}-row scale blocks")
        input_scale = None
        if scheme.activations == "static":
            input_scale = torch.stack([g["input_scale"].float().reshape(()) for g in groups]).max().reshape(1)
        bias = None if linear.bias is None else linear.bias.data.clone()
        return cls(torch.cat(weights).to(linear.weight.device), torch.cat(scales).to(linear.weight.device),
                   None if input_scale is None else input_scale.to(linear.weight.device), bias,
                   [w.shape[0] for w, _ in rows], scheme, linear.weight.dtype)

    @classmethod
    def from_dense(cls, linear: nn.Linear) -> W8Linear:
        """Quantize a dense layer at load: one scale per weight row (the whole row's, where a row-parallel layer's
        ranks each hold some of its columns), activations per token."""
        weight = linear.weight.data
        amax = weight.abs().amax(dim=1, keepdim=True)  # [out, 1]
        if isinstance(linear, RowParallelLinear):
            amax = all_reduce_max(amax, linear.tp)
        scale = absmax_scale(amax)
        bias = None if linear.bias is None else linear.bias.data.clone()
        sizes = list(getattr(linear, "output_sizes", [linear.out_features]))
        return cls(quantize(weight, scale), scale, None, bias, sizes, W8Scheme(), weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        if _scaled_mm_ready(x, self):
            return self._scaled_mm(x)
        y = F.linear(self._fake_quantize(x), self.dequantized_weight().to(x.dtype))
        return y if self.bias is None else y + self.bias

    def dequantized_weight(self) -> torch.Tensor:
        """[out, in] float32: each FP8 weight times its scale."""
        scale = self.weight_scale
        if self.scheme.weight_block is not None:
            rows, cols = self.scheme.weight_block
            scale = scale.repeat_interleave(rows, 0)[: self.weight.shape[0]]
            scale = scale.repeat_interleave(cols, 1)[:, : self.weight.shape[1]]
        return self.weight.float() * scale

    def _activation_scale(self, x: torch.Tensor) -> torch.Tensor:
        """[T, 1] scales (per token, or the static scale on each), or [T, in / group, 1] for group activations."""
        number = self.scheme.number
        if self.scheme.activations == "static":
            return self.input_scale.expand(x.shape[0], 1)
        if self.scheme.activations == "group":
            groups = x.unflatten(-1, (-1, self.scheme.activation_group))  # [T, in / group, group]
            return absmax_scale(groups.abs().amax(dim=-1, keepdim=True), number)
        return absmax_scale(self._row_absmax(x), number)

    def _row_absmax(self, x: torch.Tensor) -> torch.Tensor:
        """[T, 1] each token's absmax over its whole input row, whose columns a row-parallel layer's ranks share."""
        amax = x.abs().amax(dim=-1, keepdim=True)
        return amax if self.input_group is None else all_reduce_max(amax, self.input_group)

    def _fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """x through the 8-bit format and back, as the activations the 8-bit matmul sees."""
        scale, number = self._activation_scale(x), self.scheme.number
        if self.scheme.activations == "group":
            groups = x.unflatten(-1, (-1, self.scheme.activation_group))
            return (quantize(groups, scale, number).float() * scale).flatten(-2).to(x.dtype)
        return (quantize(x, scale, number).float() * scale).to(x.dtype)

    def _scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        """FP8 tensor cores: per-token activation scales times per-row weight scales, in bfloat16."""
        # the Triton kernel scales each token by its own columns; a row-parallel slice needs the whole row's scale
        if self.scheme.activations == "static" or self.input_group is not None or not use_fused_kernels(x):
            scale = self._activation_scale(x).contiguous()  # [T, 1]
            q = quantize(x, scale)
        else:
            from loomserve.platform.quantization.fp8_triton import per_token_fp8

            q, scale = per_token_fp8(x)  # [T, in] FP8, [T, 1]
        y = torch._scaled_mm(q, self.weight.t(), scale_a=scale,
                             scale_b=self.weight_scale.view(1, -1), out_dtype=torch.bfloat16)  # [T, out]
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias


def _scaled_mm_ready(x: torch.Tensor, layer: W8Linear) -> bool:
    """Row-scaled layers on FP8 tensor cores (compute capability 8.9+), in shapes cuBLAS takes (multiples of 16)."""
    scheme = layer.scheme
    return (x.is_cuda and scheme.number == "fp8" and scheme.weight_block is None
            and torch.cuda.get_device_capability(x.device) >= (8, 9)
            and layer.in_features % 16 == 0 and layer.out_features % 16 == 0)


def quantize_model_w8(model: nn.Module, loaded: set[str], groups: dict[str, TensorGroup] | None,
                       scheme: W8Scheme | None) -> set[str]:
    """Make every decoder linear 8-bit: the checkpoint's (`groups`, `scheme`), or quantized at load."""
    return replace_decoder_linears(model, loaded, W8Linear.from_dense,
                                   lambda linear, group: W8Linear.from_groups(linear, group, scheme), groups,
                                   lambda group, shard: shard_w8(group, shard, scheme))

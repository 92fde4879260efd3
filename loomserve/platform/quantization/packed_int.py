"""Weight-only INT4 / INT8 linears of compressed-tensors' `pack-quantized` format (llm-compressor's W4A16, W8A16):
`weight_packed` int32 [out, in * bits / 32] holds signed values offset to unsigned, unpacked with compressed-tensors'
own `unpack_from_int32`; `weight_scale` [out, groups] (or [out, 1] per channel); `weight_g_idx` [in] when act-order
permuted the groups. Symmetric only (no zero points). Dequantized, then one GEMM in the compute dtype."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loomserve.platform.quantization.base import DequantizedLinear, TensorGroup

PACKED_PARTS = ("weight_packed", "weight_shape", "weight_g_idx")


@dataclass(frozen=True)
class PackedIntScheme:
    num_bits: int  # 4 or 8
    group_size: int | None  # None: one scale per output row


def _unpack_from_int32() -> object:
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    except ImportError:  # compressed-tensors before its compressors were regrouped
        from compressed_tensors.compressors.quantized_compressors.pack_quantized import unpack_from_int32
    return unpack_from_int32


class PackedIntShard(nn.Module):
    """One projection's packed signed integers and scales."""

    def __init__(self, group: TensorGroup, scheme: PackedIntScheme) -> None:
        super().__init__()
        for part in ("weight_packed", "weight_scale", "weight_shape"):
            if part not in group:
                raise ValueError(f"a pack-quantized projection lacks its {part}")
        self.num_bits = scheme.num_bits
        self.weight_packed = nn.Parameter(group["weight_packed"], requires_grad=False)
        self.weight_scale = nn.Parameter(group["weight_scale"], requires_grad=False)  # [out, groups]
        self.shape = torch.Size(group["weight_shape"].tolist())  # (out, in)
        self.out_features = self.shape[0]
        groups = self.weight_scale.shape[1]
        g_idx = group.get("weight_g_idx")
        if g_idx is None:  # consecutive groups (one group spanning the row: per channel)
            g_idx = torch.arange(self.shape[1], device=self.weight_scale.device) // (self.shape[1] // groups)
        self.g_idx = nn.Parameter(g_idx.to(torch.int64), requires_grad=False)  # [in]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[out, in] in `dtype`: each value times its group's scale."""
        values = _unpack_from_int32()(self.weight_packed, self.num_bits, self.shape)  # [out, in] int8
        return values.to(dtype) * self.weight_scale.to(dtype)[:, self.g_idx]


def packed_int_linear(linear: nn.Linear, groups: list[TensorGroup], scheme: PackedIntScheme) -> DequantizedLinear:
    device = linear.weight.device
    return DequantizedLinear.from_shards(
        linear, [PackedIntShard({k: v.to(device) for k, v in g.items()}, scheme) for g in groups])

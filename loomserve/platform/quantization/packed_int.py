"""Weight-only INT4 / INT8 linears of compressed-tensors' `pack-quantized` format (llm-compressor's W4A16, W8A16):
`weight_packed` int32 [out, in * bits / 32] holds signed values offset to unsigned, unpacked with compressed-tensors'
own `unpack_from_int32`; `weight_scale` [out, groups] (or [out, 1] per channel); `weight_g_idx` [in] when act-order
permuted the groups. Symmetric only (no zero points). Dequantized, then one GEMM in the compute dtype."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loomserve.platform.quantization.base import DequantizedLinear, TensorGroup
from loomserve.platform.quantization.tensor_parallel import Shard, whole

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


def shard_packed_int(group: TensorGroup, shard: Shard, scheme: PackedIntScheme) -> TensorGroup:
    """One projection's packed tensors cut to a rank's slice: output rows of `weight_packed` and `weight_scale`;
    or input columns (32 / bits a word, whole groups) of `weight_packed`, `weight_g_idx` and the group scales,
    which stay whole per channel or under act-order (its columns name any group)."""
    out, columns = (int(n) for n in whole(group["weight_shape"]).tolist())
    if shard.rows:
        cut = {"weight_packed": shard.cut(group["weight_packed"], 0),
               "weight_scale": shard.cut(group["weight_scale"], 0)}
        cut |= {"weight_g_idx": whole(group["weight_g_idx"])} if "weight_g_idx" in group else {}
        return cut | {"weight_shape": torch.tensor([shard.size, columns])}
    pack = 32 // scheme.num_bits
    shard.check_units(pack, "packed word")
    if scheme.group_size is not None:
        shard.check_units(scheme.group_size, "quantization group")
    cut = {"weight_packed": shard.cut(group["weight_packed"], 1, pack), "weight_shape": torch.tensor([out, shard.size])}
    if "weight_g_idx" in group:
        return cut | {"weight_g_idx": shard.cut(group["weight_g_idx"], 0), "weight_scale": whole(group["weight_scale"])}
    if scheme.group_size is None:
        return cut | {"weight_scale": whole(group["weight_scale"])}
    return cut | {"weight_scale": shard.cut(group["weight_scale"], 1, scheme.group_size)}


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

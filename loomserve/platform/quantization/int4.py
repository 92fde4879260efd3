"""INT4 weight-only linears in the layouts GPTQ and AWQ checkpoints ship (4-bit values, one scale and zero point per
group of `group_size` input columns), dequantized then multiplied in the compute dtype.

GPTQ (AutoGPTQ / GPTQModel v1 format): `qweight` int32 [in / 8, out] packs 8 input rows per int32, lowest nibble
first; `qzeros` int32 [groups, out / 8] packs 8 output columns the same way and stores zero point - 1; `scales`
[groups, out]; `g_idx` int32 [in] names each input row's group (act-order permutes them).
AWQ (AutoAWQ GEMM): `qweight` int32 [in, out / 8] and `qzeros` int32 [groups, out / 8] pack 8 output columns per int32
in the order 0, 2, 4, 6, 1, 3, 5, 7; `scales` [groups, out]; zero points are stored as they are.

Both load into GPTQ's row-packed layout, with zero points times scales kept beside the scales, so one Triton kernel
(`int4_triton.py`) serves every batch on CUDA; on CPU the weights are dequantized for one GEMM. A fused layer keeps
each projection's tensors (act-order differs per projection). A row-parallel act-order slice holds input rows of
any group: it keeps every group's scales, and its sorted rows make groups of uneven sizes (dequantized on CUDA too).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loomserve.platform.models.layers import use_fused_kernels
from loomserve.platform.quantization.base import (
    DequantizedLinear,
    TensorGroup,
    replace_decoder_linears,
    split_groups,
)
from loomserve.platform.quantization.tensor_parallel import Shard, whole

_PARTS = ("qweight", "qzeros", "scales", "g_idx")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's nibble i holds output column AWQ_ORDER[i] of its 8
_AWQ_UNDO = [AWQ_ORDER.index(c) for c in range(8)]  # output column c sits in nibble _AWQ_UNDO[c]


@dataclass(frozen=True)
class Int4Scheme:
    method: str  # gptq | awq
    group_size: int


def check_int4_config(saved: dict[str, Any]) -> Int4Scheme:
    """The scheme of a GPTQ (v1 format) or AWQ (GEMM) 4-bit checkpoint; anything else is refused by name."""
    method = saved["quant_method"]
    bits = saved.get("bits", saved.get("w_bit"))
    group = saved.get("group_size", saved.get("q_group_size"))
    if bits != 4:
        raise ValueError(f"{method} with {bits}-bit weights is not supported; 4-bit loads")
    if group not in (32, 64, 128):
        raise ValueError(f"{method} group_size {group} is not supported; 32, 64 or 128")
    if method == "gptq":
        if saved.get("checkpoint_format", "gptq") != "gptq" or not saved.get("sym", True):
            raise ValueError("GPTQ loads in the symmetric v1 `gptq` checkpoint format only")
    elif str(saved.get("version", "gemm")).lower() != "gemm" or not saved.get("zero_point", True):
        raise ValueError("AWQ loads in the GEMM version with zero points only")
    return Int4Scheme(method, int(group))


def split_int4(weights: Iterable[tuple[str, torch.Tensor]], groups: dict[str, TensorGroup]
               ) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass dense tensors on; collect each projection's packed tensors into `groups[projection.weight]`."""
    return split_groups(weights, groups, lambda part, tensor: part in _PARTS)


def shard_int4(group: TensorGroup, shard: Shard, scheme: Int4Scheme) -> TensorGroup:
    """One projection's packed tensors cut to a rank's slice. Output columns: `qweight` (AWQ: 8 a word), `qzeros`
    (8 a word) and `scales`; `g_idx` whole. Input rows (a row-parallel slice, of whole groups): `qweight` (GPTQ: 8
    a word) and `g_idx`; `scales` and `qzeros` by groups, or whole under act-order, whose rows name any group."""
    gptq = scheme.method == "gptq"
    if shard.rows:
        shard.check_units(8, "word of 8 packed output columns")
        cut = {"qweight": shard.cut(group["qweight"], 1, 1 if gptq else 8), "scales": shard.cut(group["scales"], 1),
               "qzeros": shard.cut(group["qzeros"], 1, 8)}
        return cut | ({"g_idx": whole(group["g_idx"])} if "g_idx" in group else {})
    shard.check_units(scheme.group_size, "quantization group")
    cut = {"qweight": shard.cut(group["qweight"], 0, 8 if gptq else 1)}
    g_idx = whole(group["g_idx"]) if "g_idx" in group else None
    in_order = torch.arange(shard.full, device=cut["qweight"].device) // scheme.group_size
    if g_idx is not None and not torch.equal(g_idx.long(), in_order):  # act-order
        return cut | {"g_idx": g_idx[shard.start:shard.end], "scales": whole(group["scales"]),
                      "qzeros": whole(group["qzeros"])}
    return cut | {"scales": shard.cut(group["scales"], 0, scheme.group_size),
                  "qzeros": shard.cut(group["qzeros"], 0, scheme.group_size)}


def _shifts(device: torch.device) -> torch.Tensor:
    """The 8 nibbles of an int32, lowest first: made on `device` (a host tensor copied in could not be captured in
    a CUDA graph)."""
    return torch.arange(0, 32, 4, dtype=torch.int32, device=device)


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [n / 8, m] -> [n, m]: 8 rows per int32, lowest nibble first (GPTQ's qweight)."""
    nibbles = (packed[:, None, :] >> _shifts(packed.device)[None, :, None]) & 0xF  # [n / 8, 8, m]
    return nibbles.reshape(-1, packed.shape[1])


def unpack_columns(packed: torch.Tensor, order: list[int] | None = None) -> torch.Tensor:
    """int32 [n, m / 8] -> [n, m]: 8 columns per int32; `order[c]` is the nibble holding column c (None: c)."""
    nibbles = (packed[:, :, None] >> _shifts(packed.device)[None, None, :]) & 0xF  # [n, m / 8, 8]
    if order is not None:
        nibbles = nibbles[:, :, order]
    return nibbles.reshape(packed.shape[0], -1)


def pack_rows(values: torch.Tensor) -> torch.Tensor:
    """[n, m] 4-bit values -> int32 [n / 8, m]: 8 rows per int32, lowest nibble first (GPTQ's qweight)."""
    shifts = _shifts(values.device).long()
    packed = (values.long().reshape(-1, 8, values.shape[1]) << shifts[None, :, None]).sum(dim=1)  # [n / 8, m]
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


class Int4Shard(nn.Module):
    """One projection's INT4 weights in one layout for both formats (GPTQ's rows-packed `qweight` [in / 8, out]),
    with its scales and zero points times scales [groups, out], input rows in group order: an act-order
    checkpoint's rows are sorted by group at load and `perm` [in] gathers the input columns to match (None when the
    checkpoint's order is already that)."""

    def __init__(self, group: TensorGroup, scheme: Int4Scheme, in_features: int) -> None:
        super().__init__()
        for part in ("qweight", "qzeros", "scales"):
            if part not in group:
                raise ValueError(f"a {scheme.method} projection lacks its {part}")
        if scheme.method == "gptq":
            qweight = group["qweight"]
            zeros = unpack_columns(group["qzeros"]) + 1  # v1 stores zero point - 1
        else:
            qweight = pack_rows(unpack_columns(group["qweight"], _AWQ_UNDO))
            zeros = unpack_columns(group["qzeros"], _AWQ_UNDO)
        scales = group["scales"]  # [groups, out]
        in_order = torch.arange(in_features, device=scales.device) // scheme.group_size
        g_idx = group.get("g_idx")
        perm = row_groups = None
        if g_idx is not None and not torch.equal(g_idx.long(), in_order):
            perm = torch.argsort(g_idx.long(), stable=True)  # [in]: rows of group 0 first, then group 1, ...
            sorted_groups = g_idx.long()[perm]
            if scales.shape[0] * scheme.group_size != in_features:  # a row-parallel act-order slice: all groups
                row_groups = sorted_groups  # [in], each row's group, of uneven sizes
            elif not torch.equal(sorted_groups, in_order):
                raise ValueError(f"a {scheme.method} g_idx does not give each group {scheme.group_size} rows")
            qweight = pack_rows(unpack_rows(qweight)[perm])
        self.qweight = nn.Parameter(qweight, requires_grad=False)  # [in / 8, out] int32
        self.scales = nn.Parameter(scales, requires_grad=False)
        self.scaled_zeros = nn.Parameter(zeros.float() * scales.float(), requires_grad=False)  # [groups, out]
        self.perm = None if perm is None else nn.Parameter(perm, requires_grad=False)
        self.row_groups = None if row_groups is None else nn.Parameter(row_groups, requires_grad=False)
        self.group_size = scheme.group_size
        self.out_features = scales.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[out, in] weights in `dtype`, input columns in the checkpoint's order: value * scale - zero point *
        scale of each input row's group."""
        g = self.row_groups
        if g is None:
            g = torch.arange(self.qweight.shape[0] * 8, device=self.qweight.device) // self.group_size
        w = unpack_rows(self.qweight).to(dtype) * self.scales[g].to(dtype) - self.scaled_zeros[g].to(dtype)  # [in, out]
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(0, self.perm, w)
        return w.t()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] times the weights with the Triton kernel -> [T, out]."""
        from loomserve.platform.quantization.int4_triton import int4_matmul

        if self.row_groups is not None:  # groups of uneven sizes: the kernel takes whole groups only
            return x @ self.dequantize(x.dtype).t()
        if self.perm is not None:
            x = x[:, self.perm]
        return int4_matmul(x, self.qweight, self.scales, self.scaled_zeros, self.group_size)


class Int4Linear(DequantizedLinear):
    """INT4 projections: on CUDA the Triton kernel multiplies straight from the packed weights; on CPU the
    dequantized weights make one GEMM."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        if not use_fused_kernels(x):
            return super().forward(x)
        y = torch.cat([s.matmul(x) for s in self.shards], dim=-1)
        return y if self.bias is None else y + self.bias


def int4_linear(linear: nn.Linear, groups: list[TensorGroup], scheme: Int4Scheme) -> Int4Linear:
    """The layer of a checkpoint's packed projections (one group each) and the dense layer's loaded biases."""
    device = linear.weight.device
    shards = [Int4Shard({k: v.to(device) for k, v in g.items()}, scheme, linear.in_features) for g in groups]
    return Int4Linear.from_shards(linear, shards)


def quantize_model_int4(model: nn.Module, loaded: set[str], groups: dict[str, TensorGroup] | None,
                        scheme: Int4Scheme) -> set[str]:
    """Make every decoder linear INT4 from the checkpoint's packed tensors (INT4 does not quantize at load)."""
    return replace_decoder_linears(model, loaded, None,
                                   lambda linear, group: int4_linear(linear, group, scheme), groups,
                                   lambda group, shard: shard_int4(group, shard, scheme))

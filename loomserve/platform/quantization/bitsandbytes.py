"""NF4 weights through bitsandbytes: every linear layer of the decoder layers (not the lm_head) becomes an
`NF4Linear`, as transformers' `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")` would make it.

A fused layer (qkv, gate_up) keeps one bitsandbytes `Linear4bit` per checkpoint projection, so each
projection is quantized in its own blocks, exactly like the separate layers transformers quantizes, and a
checkpoint saved already in 4-bit form loads its packed weights and quantization states as they are.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from loomserve.platform.models.linear import dtype_of
from loomserve.platform.quantization.base import QuantizedLinear, TensorGroup, replace_decoder_linears, split_rows
from loomserve.platform.quantization.tensor_parallel import Shard, whole

BLOCKSIZE = 64  # bitsandbytes' and transformers' default 4-bit block

# The parts transformers saves next to a 4-bit `X.weight` (packed uint8): `X.weight.absmax`, ...
_STATE_PART = re.compile(r"(.+\.weight)\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..+)")


def split_prequantized(
    weights: Iterable[tuple[str, torch.Tensor]], groups: dict[str, dict[str, torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass dense tensors on; collect each 4-bit weight (packed data and its state) into `groups[weight name]`."""
    for name, tensor in weights:
        m = _STATE_PART.fullmatch(name)
        if m is not None:
            groups.setdefault(m[1], {})[m[2]] = tensor
        elif name.endswith(".weight") and dtype_of(tensor) == torch.uint8:
            groups.setdefault(name, {})["weight"] = tensor
        else:
            yield name, tensor


class NF4Linear(QuantizedLinear):
    """Projections of one input with 4-bit weights, one `bitsandbytes.nn.Linear4bit` per projection; their
    outputs are concatenated (a plain layer has one)."""

    def __init__(self, shards: list[nn.Module], in_features: int, compute_dtype: torch.dtype) -> None:
        super().__init__(in_features, [s.out_features for s in shards], compute_dtype)
        self.shards = nn.ModuleList(shards)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [shard(x) for shard in self.shards]  # each [T, out_i]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    @classmethod
    def from_dense(cls, linear: nn.Linear) -> NF4Linear:
        """Quantize a dense (possibly fused) layer projection by projection."""
        bnb = _bitsandbytes()
        shards = []
        for rows, bias in split_rows(linear):
            shard = _empty_shard(linear, rows.shape[0], bias is not None)
            weight = bnb.nn.Params4bit(rows.detach().clone(), requires_grad=False, compress_statistics=False,
                                       quant_type="nf4", blocksize=BLOCKSIZE, module=shard)
            shard.weight = weight.to(rows.device)  # quantizes
            _set_bias(shard, bias)
            shards.append(shard)
        return cls(shards, linear.in_features, linear.weight.dtype)

    @classmethod
    def from_prequantized(cls, linear: nn.Linear, groups: list[dict[str, torch.Tensor]]) -> NF4Linear:
        """Take a checkpoint's 4-bit weights (one group per projection) and the dense layer's loaded biases."""
        bnb = _bitsandbytes()
        device = linear.weight.device
        shards = []
        for (rows, bias), group in zip(split_rows(linear), groups, strict=True):
            shard = _empty_shard(linear, rows.shape[0], bias is not None)
            stats = {k: v for k, v in group.items() if k != "weight"}
            shard.weight = bnb.nn.Params4bit.from_prequantized(group["weight"], stats, device=device, module=shard)
            if tuple(shard.weight.quant_state.shape) != tuple(rows.shape):
                raise ValueError(f"4-bit weight of shape {tuple(shard.weight.quant_state.shape)}, expected "
                                 f"{tuple(rows.shape)}")
            _set_bias(shard, bias)
            shards.append(shard)
        return cls(shards, linear.in_features, linear.weight.dtype)


def shard_prequantized(group: TensorGroup, shard: Shard) -> TensorGroup:
    """One projection's saved 4-bit weight cut to a rank's slice: dequantized whole, sliced and quantized again in
    the same blocks. Where the slice holds whole blocks of the saved weight (each block's largest value is a code
    of one, so its absmax comes back exactly) its codes and absmax are the saved ones."""
    functional = _bitsandbytes().functional
    state = functional.QuantState.from_dict({k: whole(v) for k, v in group.items() if k != "weight"},
                                            device=torch.device("cpu"))
    _check_whole_blocks(shard, state.shape[1], state.blocksize)
    weight = functional.dequantize_4bit(whole(group["weight"]), state)  # [out, in]
    part = weight.narrow(0 if shard.rows else 1, shard.start, shard.size).contiguous()
    packed, part_state = functional.quantize_4bit(part, blocksize=state.blocksize, quant_type=state.quant_type,
                                                  compress_statistics=state.nested)
    return {"weight": packed} | part_state.as_dict(packed=True)


def _check_whole_blocks(shard: Shard, columns: int, blocksize: int) -> None:
    """Refuse a slice that would cut a saved block (`blocksize` consecutive values of the row-major weight)."""
    if shard.rows:
        whole_blocks = shard.start * columns % blocksize == 0 and (
            shard.end * columns % blocksize == 0 or shard.end == shard.full)
    else:
        whole_blocks = columns % blocksize == 0 and shard.start % blocksize == 0 and shard.size % blocksize == 0
    if not whole_blocks:
        side = "output rows" if shard.rows else "input columns"
        raise ValueError(f"tensor parallelism splits a 4-bit projection of {columns} columns at {side} "
                         f"{shard.start}..{shard.end}, inside its saved blocks of {blocksize} values: serve the dense "
                         "checkpoint with --quantization bitsandbytes, or tensor_parallel_size 1")


def _bitsandbytes() -> Any:
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError("NF4 weights need bitsandbytes: pip install 'bitsandbytes>=0.45'") from e
    return bitsandbytes


def _empty_shard(linear: nn.Linear, out_features: int, bias: bool) -> nn.Module:
    return _bitsandbytes().nn.Linear4bit(linear.in_features, out_features, bias=bias,
                                         compute_dtype=linear.weight.dtype, compress_statistics=False,
                                         quant_type="nf4", device="meta")


def _set_bias(shard: nn.Module, bias: torch.Tensor | None) -> None:
    if bias is not None:
        shard.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)


def quantize_model(
    model: nn.Module, loaded: set[str], prequantized: dict[str, dict[str, torch.Tensor]] | None = None
) -> set[str]:
    """Make every decoder linear NF4: quantize its loaded dense weights, or, for a 4-bit checkpoint, take the
    checkpoint's (`prequantized`: weight name -> packed data and state)."""
    return replace_decoder_linears(model, loaded, NF4Linear.from_dense, NF4Linear.from_prequantized, prequantized,
                                   shard_prequantized)

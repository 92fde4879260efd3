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

from loomserve.platform.models.packing import decoder_linears, projection_names

QUANTIZATION_METHODS = ("bitsandbytes",)
BLOCKSIZE = 64  # bitsandbytes' and transformers' default 4-bit block

# The parts transformers saves next to a 4-bit `X.weight` (packed uint8): `X.weight.absmax`, ...
_STATE_PART = re.compile(r"(.+\.weight)\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..+)")


def check_quantization(quantization: str | None, hf_config: Any) -> str | None:
    """The quantization to load with: the user's choice, or the checkpoint's own (a saved 4-bit model)."""
    if quantization is not None and quantization not in QUANTIZATION_METHODS:
        raise ValueError(f"unknown quantization {quantization!r}; choose {', '.join(QUANTIZATION_METHODS)}")
    saved = getattr(hf_config, "quantization_config", None)
    if not saved:
        return quantization
    saved = saved if isinstance(saved, dict) else saved.to_dict()
    method = saved.get("quant_method")
    if method != "bitsandbytes" or not saved.get("load_in_4bit"):
        what = f"{method} 8-bit" if saved.get("load_in_8bit") else method
        raise ValueError(f"the checkpoint is quantized with {what}; only bitsandbytes 4-bit checkpoints load")
    return "bitsandbytes"


def split_prequantized(
    weights: Iterable[tuple[str, torch.Tensor]], groups: dict[str, dict[str, torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass dense tensors on; collect each 4-bit weight (packed data and its state) into `groups[weight name]`."""
    for name, tensor in weights:
        m = _STATE_PART.fullmatch(name)
        if m is not None:
            groups.setdefault(m[1], {})[m[2]] = tensor
        elif name.endswith(".weight") and tensor.dtype == torch.uint8:
            groups.setdefault(name, {})["weight"] = tensor
        else:
            yield name, tensor


class NF4Linear(nn.Module):
    """Projections of one input with 4-bit weights, one `bitsandbytes.nn.Linear4bit` per projection; their
    outputs are concatenated (a plain layer has one)."""

    def __init__(self, shards: list[nn.Module], in_features: int, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.shards = nn.ModuleList(shards)
        self.in_features = in_features
        self.output_sizes = [s.out_features for s in shards]
        self.out_features = sum(self.output_sizes)
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [shard(x) for shard in self.shards]  # each [T, out_i]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    @classmethod
    def from_dense(cls, linear: nn.Linear) -> NF4Linear:
        """Quantize a dense (possibly fused) layer projection by projection."""
        bnb = _bitsandbytes()
        shards = []
        for rows, bias in _split_rows(linear):
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
        for (rows, bias), group in zip(_split_rows(linear), groups, strict=True):
            shard = _empty_shard(linear, rows.shape[0], bias is not None)
            stats = {k: v for k, v in group.items() if k != "weight"}
            shard.weight = bnb.nn.Params4bit.from_prequantized(group["weight"], stats, device=device, module=shard)
            if tuple(shard.weight.quant_state.shape) != tuple(rows.shape):
                raise ValueError(f"4-bit weight of shape {tuple(shard.weight.quant_state.shape)}, expected "
                                 f"{tuple(rows.shape)}")
            _set_bias(shard, bias)
            shards.append(shard)
        return cls(shards, linear.in_features, linear.weight.dtype)


def _split_rows(linear: nn.Linear) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight rows, bias rows) per projection of a possibly fused layer."""
    sizes = list(getattr(linear, "output_sizes", [linear.out_features]))
    weights = linear.weight.data.split(sizes)
    biases = linear.bias.data.split(sizes) if linear.bias is not None else [None] * len(sizes)
    return list(zip(weights, biases))


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


@torch.no_grad()
def quantize_model(
    model: nn.Module, loaded: set[str], prequantized: dict[str, dict[str, torch.Tensor]] | None = None
) -> set[str]:
    """Make every linear layer of the language model's decoder layers NF4 (towers stay dense): quantize its
    loaded dense weights, or, for a 4-bit checkpoint, take the checkpoint's (`prequantized`: weight name ->
    packed data and state). Returns `loaded` updated to the new parameter names; a layer whose weights are
    missing stays dense and unloaded, so the loader's completeness check names it."""
    loaded = set(loaded)
    for name, module in decoder_linears(model, (nn.Linear,)):
        own = {f"{name}.{p}" for p, _ in module.named_parameters()}
        if prequantized is None:
            if not own <= loaded:
                continue
            new = NF4Linear.from_dense(module)
        else:
            keys = [f"{projection}.weight" for projection in projection_names(model, name)]
            if not (own - {f"{name}.weight"} <= loaded and all("weight" in prequantized.get(k, {}) for k in keys)):
                continue
            new = NF4Linear.from_prequantized(module, [prequantized.pop(k) for k in keys])
        loaded -= own
        loaded |= {f"{name}.{p}" for p, _ in new.named_parameters()}
        parent, leaf = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), leaf, new)
    if prequantized:
        raise ValueError(f"4-bit weights with no layer to hold them: {', '.join(sorted(prequantized))}")
    return loaded

"""compressed-tensors checkpoints (llm-compressor's format): the `quantization_config` read through
compressed-tensors' own `QuantizationConfig`, mapped to the scheme of the linears that serve it: W8A8, FP8 or INT8
(weights per tensor, per channel or in blocks; activations dynamic per token or group, or static per tensor), and
weight-only symmetric INT4 / INT8 of the `pack-quantized` format (W4A16, W8A16); other schemes are refused by
name. An FP8 `kv_cache_scheme` (per tensor) is accepted, with or without quantized linears: its scales load through
`kv_scales.py` and serve `--kv-cache-dtype fp8`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from loomserve.platform.quantization.base import TensorGroup, replace_decoder_linears, split_groups
from loomserve.platform.quantization.kv_scales import check_kv_cache_scheme
from loomserve.platform.quantization.packed_int import (
    PACKED_PARTS,
    PackedIntScheme,
    packed_int_linear,
    shard_packed_int,
)
from loomserve.platform.quantization.w8a8 import W8Scheme, quantize_model_w8, split_w8

Scheme = W8Scheme | PackedIntScheme


def check_compressed_tensors_config(saved: dict[str, Any]) -> Scheme | None:
    """The one scheme all of the checkpoint's quantized linears share (None: only its KV cache is quantized, its
    scales read by `kv_scales.py`), or ValueError saying what is not served."""
    try:
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError as e:
        raise ImportError("compressed-tensors checkpoints need: pip install compressed-tensors") from e
    config = QuantizationConfig.model_validate(saved)
    schemes = {_scheme(group.weights, group.input_activations) for group in config.config_groups.values()}
    if config.kv_cache_scheme is not None:
        check_kv_cache_scheme(config.kv_cache_scheme)
        if not schemes:
            return None
    if len(schemes) != 1:
        raise ValueError(f"compressed-tensors checkpoint with {len(schemes)} different schemes; one is supported")
    return schemes.pop()


def split_compressed_tensors(weights: Iterable[tuple[str, torch.Tensor]], groups: dict[str, TensorGroup]
                             ) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass dense tensors on; collect each quantized projection's tensors (either format) into `groups`."""
    return split_w8(split_groups(weights, groups, lambda part, tensor: part in PACKED_PARTS), groups)


def quantize_model_compressed_tensors(model: nn.Module, loaded: set[str], groups: dict[str, TensorGroup] | None,
                                      scheme: Scheme | None) -> set[str]:
    if scheme is None:  # dense linears
        return loaded
    if isinstance(scheme, PackedIntScheme):
        return replace_decoder_linears(model, loaded, None, lambda linear, g: packed_int_linear(linear, g, scheme),
                                       groups, lambda group, shard: shard_packed_int(group, shard, scheme))
    return quantize_model_w8(model, loaded, groups, scheme)


def _scheme(weights: Any, activations: Any) -> Scheme:
    if weights is None or not weights.symmetric or weights.num_bits not in (4, 8):
        what = "none" if weights is None else f"{weights.type} {weights.num_bits}-bit"
        raise ValueError(f"compressed-tensors weights of {what} (symmetric={getattr(weights, 'symmetric', None)}) "
                         "are not supported yet; symmetric 8-bit W8A8 and INT4 / INT8 weight-only load")
    if activations is None and weights.type == "int" and _value(weights.strategy) in ("group", "channel"):
        return PackedIntScheme(weights.num_bits, weights.group_size if _value(weights.strategy) == "group" else None)
    if weights.num_bits != 8:
        act = "no" if activations is None else f"{activations.type} {activations.num_bits}-bit"
        raise ValueError(f"compressed-tensors {weights.type} {weights.num_bits}-bit weights with {act} activations "
                         "are not supported yet")
    number = "fp8" if weights.type == "float" else "int8"
    strategy = _value(weights.strategy)
    if strategy not in ("tensor", "channel", "block"):
        raise ValueError(f"compressed-tensors 8-bit weight strategy {strategy!r} is not supported")
    block = tuple(weights.block_structure) if strategy == "block" else None
    if activations is not None and not activations.symmetric:
        raise ValueError("compressed-tensors asymmetric activations are not supported yet")
    if activations is None:
        raise ValueError("compressed-tensors 8-bit weight-only (W8A16) is not supported yet; W8A8 loads")
    act = _value(activations.strategy)
    if activations.dynamic and act == "token":
        return W8Scheme(number, weight_block=block)
    if activations.dynamic and act == "group":
        return W8Scheme(number, weight_block=block, activations="group", activation_group=activations.group_size)
    if not activations.dynamic and act == "tensor":
        return W8Scheme(number, weight_block=block, activations="static")
    raise ValueError(f"compressed-tensors 8-bit activations {act} (dynamic={activations.dynamic}) are not supported")


def _value(strategy: Any) -> str:
    return str(getattr(strategy, "value", strategy))

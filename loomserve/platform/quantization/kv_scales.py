"""KV-cache scales saved in a checkpoint, read as vLLM reads them, into each attention layer's `KVScales`.

Names, per decoder layer: `self_attn.k_scale` / `v_scale` (llm-compressor, compressed-tensors `kv_cache_scheme`),
`self_attn.k_proj.k_scale` / `v_proj.v_scale` (ModelOpt), `self_attn.k_proj.output_scale` / `v_proj.output_scale`
(older compressed-tensors) and `self_attn.kv_scale` (one scale for both, deprecated in vLLM). Query and attention
probability scales (`q_scale`, `prob_scale`) are dropped: queries stay in the model's dtype here.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from loomserve.platform.attention.kv_quant import KVScales

logger = logging.getLogger(__name__)

_NAME = re.compile(r"(?P<layer>.*layers\.\d+)\.self_attn\.(?:(?P<proj>[qkv])_proj\.)?"
                   r"(?P<kind>k_scale|v_scale|kv_scale|q_scale|prob_scale|output_scale)")
# what each name sets: the scales it gives ("k", "v", both, or none); `output_scale` by its projection
_TARGETS = {"k_scale": ("k",), "v_scale": ("v",), "kv_scale": ("k", "v"), "q_scale": (), "prob_scale": ()}
_OUTPUT_SCALE = {"k": ("k",), "v": ("v",), "q": ()}


def check_kv_cache_scheme(scheme: Any) -> None:
    """A compressed-tensors `kv_cache_scheme` (QuantizationArgs) this cache serves: float8, one static scale per
    tensor for keys and one for values of each layer."""
    strategy = str(getattr(scheme.strategy, "value", scheme.strategy))
    if scheme.type != "float" or scheme.num_bits != 8 or strategy != "tensor" or not scheme.symmetric:
        raise ValueError(f"compressed-tensors kv_cache_scheme of {scheme.type} {scheme.num_bits}-bit per {strategy} "
                         f"(symmetric={scheme.symmetric}) is not supported; a float 8-bit per-tensor symmetric one "
                         "loads (serve it with --kv-cache-dtype fp8)")


def split_kv_scales(weights: Iterable[tuple[str, Any]], scales: dict[str, dict[str, float]]
                    ) -> Iterator[tuple[str, Any]]:
    """Pass the model's tensors on; collect KV-cache scales into `scales` (decoder layer -> {"k"/"v": scale}) as
    the returned iterator is consumed."""
    for name, tensor in weights:
        match = _NAME.fullmatch(name)
        if match is None:
            yield name, tensor
            continue
        kind = match["kind"]
        targets = _OUTPUT_SCALE[match["proj"] or "q"] if kind == "output_scale" else _TARGETS[kind]
        for target in targets:
            scales.setdefault(match["layer"], {})[target] = _scalar(name, tensor)


def load_kv_scales(model: nn.Module, scales: dict[str, dict[str, float]]) -> None:
    """Set each decoder layer's attention scales from `scales` (layer -> {"k"/"v": scale}; a missing one stays 1.0)."""
    if not scales:
        return
    by_layer = {_layer_key(name): module for name, module in model.named_modules() if isinstance(module, KVScales)}
    for layer, found in scales.items():
        module = by_layer.get(_layer_key(layer))
        if module is None:
            raise ValueError(f"the checkpoint has KV-cache scales for {layer}, which has no attention layer here")
        module.set(found.get("k", module.k_scale.item()), found.get("v", module.v_scale.item()))
    logger.info("KV-cache scales of %d layers loaded from the checkpoint", len(scales))


def _layer_key(name: str) -> str:
    """`...layers.N` of a module or tensor name: what a checkpoint's and a model's spellings share."""
    match = re.search(r"layers\.\d+", name)
    return match.group(0) if match else name


def _scalar(name: str, tensor: Any) -> float:
    values = (tensor if isinstance(tensor, torch.Tensor) else tensor[...]).float()  # a tensor or a lazy slice
    if values.numel() != 1:
        raise ValueError(f"{name}: KV-cache scales per head or channel ({values.numel()} values) are not supported; "
                         "one per tensor loads")
    return float(values.item())

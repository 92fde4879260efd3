"""PEFT adapter folders -> checked per-layer LoRA weights (A, B, scaling), or a clear reason for refusing one.

A folder holds `adapter_config.json` and `adapter_model.safetensors` (or `.bin`) with tensors named
`base_model.model.<module>.lora_A.weight` ([r, in]) and `...lora_B.weight` ([out, r]). Each module maps to a
`LoRATarget`: the (possibly fused) layer of the engine's model that holds it and the slice of its output.
Scaling follows peft: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`, per-module alphas
from `alpha_pattern`; ranks come from the tensors (so `rank_pattern` needs nothing more).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loomserve.adapters.request import LoRARequest

ADAPTER_CONFIG = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"
_PREFIX = "base_model.model."
_TENSOR_NAME = re.compile(r"(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight")

# Config switches of peft LoRA variants whose math differs from plain LoRA: value set -> refused, with why.
_REFUSED_FLAGS = {
    "use_dora": "DoRA adapters (use_dora) are not supported",
    "lora_bias": "adapters with a bias on lora_B (lora_bias) are not supported",
    "use_qalora": "QA-LoRA adapters (use_qalora) are not supported",
    "use_bdlora": "block-diagonal LoRA adapters (use_bdlora) are not supported",
    "modules_to_save": "adapters with modules_to_save (whole replaced modules: {value}) are not supported",
    "trainable_token_indices": "adapters with trainable tokens (trainable_token_indices) are not supported",
    "target_parameters": "adapters on parameters (target_parameters: {value}) are not supported",
    "alora_invocation_tokens": "activated LoRA adapters (alora_invocation_tokens) are not supported",
    "layer_replication": "adapters with layer_replication are not supported",
    "arrow_config": "Arrow routing adapters (arrow_config) are not supported",
    "kasa_config": "KaSA adapters (kasa_config) are not supported",
    "velora_config": "VeLoRA adapters (velora_config) are not supported",
    "monteclora_config": "MonteCLoRA adapters (monteclora_config) are not supported",
}


class LoRALoadError(ValueError):
    """An adapter that cannot be served, with the reason."""


@dataclass(frozen=True)
class LoRATarget:
    """A projection the engine can adapt: the layer that computes it and its slice of that layer's output."""

    layer: str  # module name in the engine's model, e.g. model.layers.0.self_attn.qkv_proj
    slice_index: int
    in_features: int
    out_features: int


@dataclass
class LoRAWeights:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class LoRAModel:
    """One adapter's weights on the host, grouped by the engine's layers: layer name -> slice -> weights."""

    request: LoRARequest
    rank: int  # the largest module rank
    weights: dict[str, dict[int, LoRAWeights]]

    @property
    def nbytes(self) -> int:
        return sum(w.a.nbytes + w.b.nbytes for slices in self.weights.values() for w in slices.values())


def load_lora_model(
    request: LoRARequest,
    targets: dict[str, LoRATarget],
    max_rank: int,
    dtype: torch.dtype,
    canonical_name: Callable[[str], str] | None = None,
) -> LoRAModel:
    """Read and check an adapter folder against the model's targets; raises LoRALoadError saying why not.
    `canonical_name` maps the adapter's module names onto the targets' where checkpoints of the model come in
    several layouts (multimodal models: `model.language_model.layers.*`, `language_model.model.layers.*`)."""
    folder = Path(request.lora_path)
    if not folder.is_dir():
        raise LoRALoadError(f"no adapter at {request.lora_path!r}: not a folder")
    config = _read_config(folder)
    _check_config_rank(config, max_rank)
    tensors = _read_tensors(folder)
    pairs = _pair_tensors(tensors)
    if not pairs:
        raise LoRALoadError(f"{folder / _weights_name(folder)} holds no LoRA weights")
    alpha = config.get("lora_alpha", 8)
    alpha_pattern = config.get("alpha_pattern") or {}
    weights: dict[str, dict[int, LoRAWeights]] = {}
    rank = 0
    for module, (a, b) in sorted(pairs.items()):
        target = _target(module, targets, canonical_name)
        _check_shapes(module, a, b, target, max_rank)
        r = a.shape[0]
        module_alpha = alpha_pattern.get(_pattern_key(alpha_pattern, module), alpha)
        scaling = module_alpha / math.sqrt(r) if config.get("use_rslora") else module_alpha / r
        weights.setdefault(target.layer, {})[target.slice_index] = LoRAWeights(
            a.to(dtype).contiguous(), b.to(dtype).contiguous(), float(scaling)
        )
        rank = max(rank, r)
    return LoRAModel(request, rank, weights)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise LoRALoadError(f"{folder} has no {ADAPTER_CONFIG}: not a PEFT adapter folder")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoRALoadError(f"cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise LoRALoadError(f"{path} does not hold a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise LoRALoadError(f"the adapter is of peft type {peft_type!r}; only LORA adapters can be served")
    for key, reason in _REFUSED_FLAGS.items():
        value = config.get(key)
        if value:
            raise LoRALoadError(f"cannot serve the adapter at {folder}: {reason.format(value=value)}")
    if config.get("bias", "none") != "none":
        raise LoRALoadError(
            f"cannot serve the adapter at {folder}: it trains base-model biases (bias={config['bias']!r}); "
            "only bias='none' is supported"
        )
    return config


def _check_config_rank(config: dict[str, Any], max_rank: int) -> None:
    """The ranks the config declares (`r`, `rank_pattern`) within --max-lora-rank, as vLLM checks them: a config
    whose rank the engine cannot hold is refused even where the tensors are smaller."""
    ranks = [config.get("r", 8), *(config.get("rank_pattern") or {}).values()]
    for rank in ranks:
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise LoRALoadError(f"the adapter's config declares rank {rank!r}; a LoRA rank is a positive integer")
        if rank > max_rank:
            raise LoRALoadError(f"LoRA rank {rank} is greater than max_lora_rank {max_rank} (--max-lora-rank)")


def _weights_name(folder: Path) -> str:
    return SAFETENSORS_FILE if (folder / SAFETENSORS_FILE).is_file() else BIN_FILE


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / _weights_name(folder)
    if not path.is_file():
        raise LoRALoadError(f"{folder} has neither {SAFETENSORS_FILE} nor {BIN_FILE}")
    try:
        if path.name == SAFETENSORS_FILE:
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and pickle raise many kinds of errors for a damaged file
        raise LoRALoadError(f"cannot read {path}: {e}") from None
    if not isinstance(tensors, dict):
        raise LoRALoadError(f"{path} does not hold a dict of tensors")
    return tensors


def _pair_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name (as in the base model) -> (A, B); anything but plain LoRA weights is refused by name."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        key = name.removeprefix(_PREFIX)
        if "lora_embedding_" in key:
            raise LoRALoadError(f"the adapter targets the embedding {key.split('.lora_embedding_')[0]!r}; "
                                "LoRA on embeddings is not supported")
        if "lora_magnitude_vector" in key:
            raise LoRALoadError("DoRA adapters (lora_magnitude_vector) are not supported")
        m = _TENSOR_NAME.fullmatch(key)
        if m is None:
            raise LoRALoadError(f"unexpected tensor {name!r} in the adapter: only lora_A / lora_B weights load")
        parts.setdefault(m["module"], {})[m["kind"]] = tensor
    pairs = {}
    for module, ab in parts.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise LoRALoadError(f"{module} has {', '.join(sorted(ab))} but not both lora_A and lora_B")
        pairs[module] = (ab["lora_A"], ab["lora_B"])
    return pairs


def _target(
    module: str, targets: dict[str, LoRATarget], canonical_name: Callable[[str], str] | None
) -> LoRATarget:
    target = targets.get(canonical_name(module) if canonical_name is not None else module)
    if target is not None:
        return target
    leaf = module.rsplit(".", 1)[-1]
    if leaf in ("lm_head", "embed_tokens"):
        raise LoRALoadError(f"the adapter targets {module!r}; LoRA on the embeddings or lm_head is not supported")
    if ".experts." in f".{module}.":
        raise LoRALoadError(f"the adapter targets the MoE expert {module!r}; LoRA on experts is not supported "
                            "(adapt the attention projections, or a shared expert)")
    known = sorted({name.rsplit(".", 1)[-1] for name in targets})
    raise LoRALoadError(
        f"the adapter targets {module!r}, which this model does not have or does not adapt (it adapts "
        f"{', '.join(known)} in its language model's decoder layers)"
    )


def _check_shapes(module: str, a: torch.Tensor, b: torch.Tensor, target: LoRATarget, max_rank: int) -> None:
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise LoRALoadError(f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit together")
    if a.shape[1] != target.in_features or b.shape[0] != target.out_features:
        raise LoRALoadError(
            f"{module}: the adapter maps {a.shape[1]} -> {b.shape[0]} features but the model's projection maps "
            f"{target.in_features} -> {target.out_features}; the adapter was made for another model"
        )
    if a.shape[0] > max_rank:
        raise LoRALoadError(f"{module} has rank {a.shape[0]}, over the maximum LoRA rank {max_rank} (--max-lora-rank)")
    if not (a.is_floating_point() and b.is_floating_point()):
        raise LoRALoadError(f"{module}: LoRA weights must be floating point, got {a.dtype} and {b.dtype}")


def _pattern_key(patterns: dict[str, Any], module: str) -> str:
    """peft's `get_pattern_key`: the first pattern matching the end of the module name, else the name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module

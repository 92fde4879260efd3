"""Model families and the registry from a checkpoint's `architectures` entry to an implementation."""

from __future__ import annotations

from torch import nn

from loomserve.platform.models.decoder import DecoderForCausalLM
from loomserve.platform.models.multimodal_registry import MULTIMODAL_MODELS

_MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": DecoderForCausalLM,
    "MistralForCausalLM": DecoderForCausalLM,
    "Qwen2ForCausalLM": DecoderForCausalLM,
    "Qwen3ForCausalLM": DecoderForCausalLM,
}
_MODELS.update(MULTIMODAL_MODELS)

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_MODELS)


def get_model_class(architecture: str) -> type[nn.Module]:
    if architecture not in _MODELS:
        raise ValueError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return _MODELS[architecture]


__all__ = ["SUPPORTED_ARCHITECTURES", "DecoderForCausalLM", "get_model_class"]

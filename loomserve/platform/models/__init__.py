"""Model families and the registry from a checkpoint's `architectures` entry to an implementation."""

from __future__ import annotations

from torch import nn

from loomserve.platform.models.bert import BertClassificationModel, BertEmbeddingModel
from loomserve.platform.models.decoder import DecoderForCausalLM
from loomserve.platform.models.decoder_embedding import DecoderForEmbedding
from loomserve.platform.models.multimodal_registry import MULTIMODAL_MODELS

_MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": DecoderForCausalLM,
    "MistralForCausalLM": DecoderForCausalLM,
    "Qwen2ForCausalLM": DecoderForCausalLM,
    "Qwen3ForCausalLM": DecoderForCausalLM,
    "LlamaModel": DecoderForEmbedding,
    "MistralModel": DecoderForEmbedding,
    "Qwen2Model": DecoderForEmbedding,
    "Qwen3Model": DecoderForEmbedding,
    "BertModel": BertEmbeddingModel,
    "RobertaModel": BertEmbeddingModel,
    "XLMRobertaModel": BertEmbeddingModel,
    "BertForSequenceClassification": BertClassificationModel,
    "RobertaForSequenceClassification": BertClassificationModel,
    "XLMRobertaForSequenceClassification": BertClassificationModel,
}
_MODELS.update(MULTIMODAL_MODELS)

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_MODELS)

# What each kind of implementation can serve, the default first.
_TASKS: dict[type[nn.Module], tuple[str, ...]] = {
    DecoderForCausalLM: ("generate", "embed"),
    DecoderForEmbedding: ("embed",),
    BertEmbeddingModel: ("embed",),
    BertClassificationModel: ("classify",),
    **{model_cls: ("generate",) for model_cls in MULTIMODAL_MODELS.values()},
}


def get_model_class(architecture: str, task: str = "generate") -> type[nn.Module]:
    if architecture not in _MODELS:
        raise ValueError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    model_cls = _MODELS[architecture]
    if model_cls is DecoderForCausalLM and task == "embed":
        return DecoderForEmbedding  # a causal LM served as an embedder needs no LM head
    return model_cls


def architecture_tasks(architecture: str) -> tuple[str, ...]:
    """The tasks a checkpoint of `architecture` can serve, its default first."""
    return _TASKS[get_model_class(architecture)]


def is_encoder_only(architecture: str) -> bool:
    """Bidirectional attention: a prompt runs whole in one step and keeps no KV cache."""
    return not getattr(get_model_class(architecture), "uses_kv_cache", True)


__all__ = ["SUPPORTED_ARCHITECTURES", "DecoderForCausalLM", "architecture_tasks", "get_model_class", "is_encoder_only"]

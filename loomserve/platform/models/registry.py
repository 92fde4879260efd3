"""The one model registry: a checkpoint's `architectures` entry -> the model class that serves it, the processor
that turns its media into placeholder tokens, and the tasks it serves; and the resolution of a requested task.

Classes and processors are named "module:Class" and imported when first asked for, so reading the table imports
no model code, and text-only serving no imaging libraries. What a class can do is stated by its flags
(`interfaces.py`); the sentence-transformers files that pick a checkpoint's pooling are read in `pooling/`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loomserve.modalities.config import MultiModalConfig
    from loomserve.modalities.processors.base import MultiModalProcessor
    from loomserve.platform.models.interfaces import ServedModel

TASKS = ("generate", "embed", "classify")


@dataclass(frozen=True)
class ModelEntry:
    model: str  # "module:Class" serving the default task
    tasks: tuple[str, ...]  # the tasks a checkpoint of the architecture serves, the default first
    processor: str | None = None  # "module:Class" of the media processor; None: text only
    embed_model: str | None = None  # "module:Class" serving "embed" where `model` generates: no LM head is built
    pooling_type: str | None = None  # the pooling its vectors come from, where no sentence-transformers file says


_MODELS = "loomserve.platform.models"
_PROCESSORS = "loomserve.modalities.processors"
_EMBEDDER = f"{_MODELS}.decoder_embedding:DecoderForEmbedding"
_CAUSAL_LM = ModelEntry(f"{_MODELS}.decoder:DecoderForCausalLM", ("generate", "embed"), embed_model=_EMBEDDER)
_DECODER_EMBEDDER = ModelEntry(_EMBEDDER, ("embed",))
_MOE_CAUSAL_LM = ModelEntry(f"{_MODELS}.moe_decoder:MoeForCausalLM", ("generate",))
_ENCODER = ModelEntry(f"{_MODELS}.bert:BertEmbeddingModel", ("embed",))
_CLASSIFIER = ModelEntry(f"{_MODELS}.bert:BertClassificationModel", ("classify",))
_QWEN2_VL_PROCESSOR = f"{_PROCESSORS}.qwen2_vl:Qwen2VLProcessor"
_IMAGE_EMBEDDING_PROCESSOR = f"{_PROCESSORS}.image_embedding:ImageEmbeddingProcessor"

REGISTRY: dict[str, ModelEntry] = {
    "LlamaForCausalLM": _CAUSAL_LM,
    "MistralForCausalLM": _CAUSAL_LM,
    "Qwen2ForCausalLM": _CAUSAL_LM,
    "Qwen3ForCausalLM": _CAUSAL_LM,
    "Qwen3MoeForCausalLM": _MOE_CAUSAL_LM,
    "Qwen2MoeForCausalLM": _MOE_CAUSAL_LM,
    "MixtralForCausalLM": _MOE_CAUSAL_LM,
    "OlmoeForCausalLM": _MOE_CAUSAL_LM,
    "LlamaModel": _DECODER_EMBEDDER,
    "MistralModel": _DECODER_EMBEDDER,
    "Qwen2Model": _DECODER_EMBEDDER,
    "Qwen3Model": _DECODER_EMBEDDER,
    "BertModel": _ENCODER,
    "RobertaModel": _ENCODER,
    "XLMRobertaModel": _ENCODER,
    "BertForSequenceClassification": _CLASSIFIER,
    "RobertaForSequenceClassification": _CLASSIFIER,
    "XLMRobertaForSequenceClassification": _CLASSIFIER,
    "LlavaForConditionalGeneration": ModelEntry(
        f"{_MODELS}.llava:LlavaForConditionalGeneration", ("generate",), f"{_PROCESSORS}.llava:LlavaProcessor"
    ),
    "Qwen2VLForConditionalGeneration": ModelEntry(
        f"{_MODELS}.qwen2_vl:Qwen2VLForConditionalGeneration", ("generate",), _QWEN2_VL_PROCESSOR
    ),
    "Qwen2_5_VLForConditionalGeneration": ModelEntry(
        f"{_MODELS}.qwen2_vl:Qwen2_5_VLForConditionalGeneration", ("generate",), _QWEN2_VL_PROCESSOR
    ),
    "CLIPModel": ModelEntry(
        f"{_MODELS}.clip_embedding:CLIPEmbeddingModel", ("embed",), _IMAGE_EMBEDDING_PROCESSOR, pooling_type="LAST"
    ),
    "SiglipModel": ModelEntry(
        f"{_MODELS}.siglip:SiglipEmbeddingModel", ("embed",), _IMAGE_EMBEDDING_PROCESSOR, pooling_type="LAST"
    ),
    "Qwen2AudioForConditionalGeneration": ModelEntry(
        f"{_MODELS}.qwen2_audio:Qwen2AudioForConditionalGeneration",
        ("generate",),
        f"{_PROCESSORS}.qwen2_audio:Qwen2AudioProcessor",
    ),
    "WhisperForConditionalGeneration": ModelEntry(
        f"{_MODELS}.whisper:WhisperForConditionalGeneration", ("generate",), f"{_PROCESSORS}.whisper:WhisperProcessor"
    ),
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(REGISTRY)


def model_entry(architecture: str) -> ModelEntry:
    if architecture not in REGISTRY:
        raise ValueError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return REGISTRY[architecture]


def get_model_class(architecture: str, task: str = "generate") -> type[ServedModel]:
    entry = model_entry(architecture)
    return _import(entry.embed_model if task == "embed" and entry.embed_model else entry.model)


def architecture_tasks(architecture: str) -> tuple[str, ...]:
    """The tasks a checkpoint of `architecture` can serve, its default first."""
    return model_entry(architecture).tasks


def resolve_task(architecture: str, task: str = "auto", has_pooling: bool = False) -> str:
    """The task to serve: `task` if the architecture serves it; for "auto" its default, or "embed" where the
    checkpoint says how to pool (`has_pooling`: sentence-transformers files) and the architecture can embed."""
    tasks = architecture_tasks(architecture)
    if task == "auto":
        return "embed" if has_pooling and "embed" in tasks else tasks[0]
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose auto, {', '.join(TASKS)}")
    if task not in tasks:
        raise ValueError(f"a {architecture} checkpoint cannot serve the {task!r} task, only: {', '.join(tasks)}")
    return task


def is_encoder_only(architecture: str) -> bool:
    """Bidirectional attention: a prompt runs whole in one step and keeps no KV cache."""
    return get_model_class(architecture).encoder_only


def default_pooling_type(architecture: str) -> str | None:
    """The pooling the architecture's embeddings are defined by (None: the task's default)."""
    return model_entry(architecture).pooling_type


def is_encoder_decoder(architecture: str) -> bool:
    """An encoder run once per request and a decoder cross-attending to it (Whisper)."""
    return get_model_class(architecture).is_encoder_decoder


def is_multimodal(architecture: str) -> bool:
    return model_entry(architecture).processor is not None


def create_processor(model_config: Any, tokenizer: Any, mm_config: MultiModalConfig) -> MultiModalProcessor | None:
    """The processor of `model_config`'s architecture, or None for a text-only model."""
    target = model_entry(model_config.architecture).processor
    if target is None:
        return None
    return _import(target)(model_config.model, model_config.hf_config, tokenizer, mm_config)


def _import(target: str) -> Any:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)

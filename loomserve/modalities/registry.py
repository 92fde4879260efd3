"""ModalityRegistry: which processor turns media into placeholder tokens for each model architecture."""

from __future__ import annotations

from typing import Any

from loomserve.modalities.config import MultiModalConfig
from loomserve.modalities.processors.base import MultiModalProcessor
from loomserve.modalities.processors.llava import LlavaProcessor
from loomserve.modalities.processors.qwen2_audio import Qwen2AudioProcessor
from loomserve.modalities.processors.qwen2_vl import Qwen2VLProcessor


class ModalityRegistry:
    def __init__(self) -> None:
        self._processors: dict[str, type[MultiModalProcessor]] = {}

    def register(self, architecture: str, processor_cls: type[MultiModalProcessor]) -> None:
        self._processors[architecture] = processor_cls

    def is_multimodal(self, architecture: str) -> bool:
        return architecture in self._processors

    def create_processor(
        self, model_config: Any, tokenizer: Any, mm_config: MultiModalConfig
    ) -> MultiModalProcessor | None:
        """The model's processor, or None for a text-only model."""
        processor_cls = self._processors.get(model_config.architecture)
        if processor_cls is None:
            return None
        return processor_cls(model_config.model, model_config.hf_config, tokenizer, mm_config)


MODALITY_REGISTRY = ModalityRegistry()
MODALITY_REGISTRY.register("LlavaForConditionalGeneration", LlavaProcessor)
MODALITY_REGISTRY.register("Qwen2VLForConditionalGeneration", Qwen2VLProcessor)
MODALITY_REGISTRY.register("Qwen2_5_VLForConditionalGeneration", Qwen2VLProcessor)
MODALITY_REGISTRY.register("Qwen2AudioForConditionalGeneration", Qwen2AudioProcessor)

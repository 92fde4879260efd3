"""ModalityRegistry: which processor turns media into placeholder tokens for each model architecture.

Processors are imported when a multimodal model is served, so text-only serving needs no imaging libraries.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from loomserve.modalities.config import MultiModalConfig

if TYPE_CHECKING:
    from loomserve.modalities.processors.base import MultiModalProcessor


class ModalityRegistry:
    def __init__(self) -> None:
        self._processors: dict[str, str] = {}  # architecture -> "module:Class"

    def register(self, architecture: str, processor: str) -> None:
        self._processors[architecture] = processor

    def is_multimodal(self, architecture: str) -> bool:
        return architecture in self._processors

    def create_processor(
        self, model_config: Any, tokenizer: Any, mm_config: MultiModalConfig
    ) -> MultiModalProcessor | None:
        """The model's processor, or None for a text-only model."""
        target = self._processors.get(model_config.architecture)
        if target is None:
            return None
        module, name = target.split(":")
        processor_cls = getattr(importlib.import_module(module), name)
        return processor_cls(model_config.model, model_config.hf_config, tokenizer, mm_config)


_PROCESSORS = "loomserve.modalities.processors"
MODALITY_REGISTRY = ModalityRegistry()
MODALITY_REGISTRY.register("LlavaForConditionalGeneration", f"{_PROCESSORS}.llava:LlavaProcessor")
MODALITY_REGISTRY.register("Qwen2VLForConditionalGeneration", f"{_PROCESSORS}.qwen2_vl:Qwen2VLProcessor")
MODALITY_REGISTRY.register("Qwen2_5_VLForConditionalGeneration", f"{_PROCESSORS}.qwen2_vl:Qwen2VLProcessor")
MODALITY_REGISTRY.register("Qwen2AudioForConditionalGeneration", f"{_PROCESSORS}.qwen2_audio:Qwen2AudioProcessor")

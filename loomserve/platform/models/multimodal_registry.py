"""Vision- and audio-language architectures, merged into the model registry."""

from __future__ import annotations

from torch import nn

from loomserve.platform.models.llava import LlavaForConditionalGeneration
from loomserve.platform.models.qwen2_audio import Qwen2AudioForConditionalGeneration
from loomserve.platform.models.qwen2_vl import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

MULTIMODAL_MODELS: dict[str, type[nn.Module]] = {
    "LlavaForConditionalGeneration": LlavaForConditionalGeneration,
    "Qwen2VLForConditionalGeneration": Qwen2VLForConditionalGeneration,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLForConditionalGeneration,
    "Qwen2AudioForConditionalGeneration": Qwen2AudioForConditionalGeneration,
}

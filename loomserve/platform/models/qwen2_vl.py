"""Qwen2VLForConditionalGeneration and Qwen2_5_VLForConditionalGeneration over packed tokens: the Qwen2
decoder with multimodal RoPE, fed by the Qwen vision transformer for images and videos."""

from __future__ import annotations

from typing import Any

import torch

from loomserve.modalities.inputs import MultiModalItem
from loomserve.platform.models.decoder import head_dim_of
from loomserve.platform.models.mrope import MRopeGrid, MRopePositions, MRotaryEmbedding, mrope_positions
from loomserve.platform.models.multimodal import MultiModalForCausalLM
from loomserve.platform.models.qwen2_vl_vision import QwenVisionTransformer


class Qwen2VLForConditionalGeneration(MultiModalForCausalLM):
    uses_mrope = True
    tower_prefixes = ("visual",)
    qwen2_5 = False

    def __init__(self, hf_config: Any, attention_backend: str = "auto") -> None:
        super().__init__(hf_config, attention_backend)
        text = hf_config.get_text_config()
        self.language_model.model.rotary_emb = MRotaryEmbedding(text, head_dim_of(text))
        self.visual = QwenVisionTransformer(hf_config.vision_config, qwen2_5=self.qwen2_5)
        self.merge = hf_config.vision_config.spatial_merge_size
        self.tokens_per_second = getattr(hf_config.vision_config, "tokens_per_second", 1.0)

    def encode(self, modality: str, items: list[MultiModalItem]) -> list[torch.Tensor]:
        device = self.visual.patch_embed.proj.weight.device
        batch = [(it.data["pixel_values"].to(device), tuple(it.data["grid_thw"].tolist())) for it in items]
        return self.visual(batch)

    def mrope_positions(self, num_prompt_tokens: int, items: list[MultiModalItem]) -> MRopePositions:
        grids = []
        for it in items:
            t, h, w = it.data["grid_thw"].tolist()
            interval = 1.0
            if self.qwen2_5 and it.modality == "video":
                interval = self.tokens_per_second * it.meta["second_per_grid"]
            grids.append(MRopeGrid(it.placeholder.offset, t, h // self.merge, w // self.merge, interval))
        return mrope_positions(num_prompt_tokens, grids)


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    qwen2_5 = True

"""LlavaForConditionalGeneration over packed tokens: CLIP features -> two-layer projector -> any decoder
family the engine serves, one image embedding per `<image>` token."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.activations import ACT2FN

from loomserve.modalities.inputs import MultiModalItem
from loomserve.platform.models.clip import CLIPVisionTower
from loomserve.platform.models.multimodal import MultiModalForCausalLM


class LlavaProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, act: str, bias: bool) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim, bias=bias)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(out_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaForConditionalGeneration(MultiModalForCausalLM):
    tower_prefixes = ("vision_tower", "multi_modal_projector")

    def __init__(self, hf_config: Any, attention_backend: str = "auto") -> None:
        super().__init__(hf_config, attention_backend)
        layers = hf_config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        vision = hf_config.vision_config
        self.vision_tower = CLIPVisionTower(vision, layers, hf_config.vision_feature_select_strategy == "default")
        self.multi_modal_projector = LlavaProjector(
            vision.hidden_size * len(layers), hf_config.get_text_config().hidden_size,
            hf_config.projector_hidden_act, getattr(hf_config, "multimodal_projector_bias", True),
        )

    def canonical_name(self, name: str) -> str:
        return super().canonical_name(name).replace("vision_tower.vision_model.", "vision_tower.")

    def skips_weight(self, name: str) -> bool:
        """CLIP's post-layernorm and the layers after the last feature layer do not reach LLaVA's features."""
        if name.startswith("vision_tower.post_layernorm."):
            return True
        prefix = "vision_tower.encoder.layers."
        used = len(self.vision_tower.encoder.layers)
        return name.startswith(prefix) and int(name.removeprefix(prefix).split(".")[0]) >= used

    def encode(self, modality: str, items: list[MultiModalItem]) -> list[torch.Tensor]:
        device = self.vision_tower.embeddings.class_embedding.device
        pixels = torch.stack([it.data["pixel_values"] for it in items]).to(device)  # [B, 3, S, S]
        return list(self.multi_modal_projector(self.vision_tower(pixels)))

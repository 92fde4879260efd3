"""CLIPModel for the embed task: the causal text tower pooled at its EOS token, then `text_projection`; the vision
tower's class token after `post_layernorm`, then `visual_projection` (transformers' `get_text_features` /
`get_image_features`). The vision tower is the one LLaVA uses (`clip.py`), run through all its layers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loomserve.platform.models.clip import CLIPVisionTower
from loomserve.platform.models.image_text import ImageTextEmbeddingModel


class CLIPEmbeddingModel(ImageTextEmbeddingModel):
    def __init__(self, hf_config: Any, attention_backend: str = "auto") -> None:
        super().__init__(hf_config, causal_text=True, embed_dim=hf_config.projection_dim)
        text, vision = hf_config.text_config, hf_config.vision_config
        self.vision_model = CLIPVisionTower(vision, [vision.num_hidden_layers], drop_cls=False)
        self.post_layernorm = nn.LayerNorm(vision.hidden_size, eps=vision.layer_norm_eps)
        self.text_projection = nn.Linear(text.hidden_size, self.embed_dim, bias=False)
        self.visual_projection = nn.Linear(vision.hidden_size, self.embed_dim, bias=False)

    def canonical_name(self, name: str) -> str:
        return name.replace("vision_model.post_layernorm.", "post_layernorm.")

    def text_projection_of(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.text_projection(hidden)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        cls = self.vision_model(pixel_values)[:, 0]  # [B, vision hidden]: the class token of the last layer
        return self.visual_projection(self.post_layernorm(cls))

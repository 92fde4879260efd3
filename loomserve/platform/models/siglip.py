"""SiglipModel for the embed task: the bidirectional text tower's last token through its `head`; the vision tower
(patch embeddings with learned positions, no class token, CLIP-style pre-norm layers, `post_layernorm`) pooled by its
multi-head attention head: a learned probe attends over the patches (transformers' `get_text_features` /
`get_image_features`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loomserve.platform.models.clip import CLIPMLP, CLIPEncoderLayer
from loomserve.platform.models.image_text import ImageTextEmbeddingModel


class SiglipAttentionPoolingHead(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        dim = config.hidden_size
        self.probe = nn.Parameter(torch.empty(1, 1, dim))
        self.attention = nn.MultiheadAttention(dim, config.num_attention_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(dim, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, patches, dim] -> [B, dim]."""
        pooled = self.attention(self.probe.expand(x.shape[0], -1, -1), x, x, need_weights=False)[0]  # [B, 1, dim]
        pooled = pooled + self.mlp(self.layernorm(pooled))
        return pooled[:, 0]


class SiglipVisionTower(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        dim = config.hidden_size
        self.image_size, self.patch = config.image_size, config.patch_size
        self.embeddings = nn.Module()
        self.embeddings.patch_embedding = nn.Conv2d(config.num_channels, dim, self.patch, self.patch)
        self.embeddings.position_embedding = nn.Embedding((self.image_size // self.patch) ** 2, dim)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.head = SiglipAttentionPoolingHead(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, dim]."""
        if pixel_values.shape[-2:] != (self.image_size, self.image_size):
            size = f"{self.image_size}x{self.image_size}"
            raise ValueError(f"SigLIP takes {size} images, got {tuple(pixel_values.shape)}")
        emb = self.embeddings
        x = emb.patch_embedding(pixel_values.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        x = x + emb.position_embedding.weight  # [B, patches, dim]
        for layer in self.encoder.layers:
            x = layer(x)
        return self.head(self.post_layernorm(x))


class SiglipEmbeddingModel(ImageTextEmbeddingModel):
    def __init__(self, hf_config: Any, attention_backend: str = "auto") -> None:
        text, vision = hf_config.text_config, hf_config.vision_config
        super().__init__(hf_config, causal_text=False, embed_dim=vision.hidden_size)
        if text.projection_size != vision.hidden_size:
            raise ValueError(f"SigLIP's text head gives {text.projection_size} dims but its vision tower "
                             f"{vision.hidden_size}: the two embeddings would not share a space")
        self.text_model.head = nn.Linear(text.hidden_size, text.projection_size)
        if not getattr(vision, "vision_use_head", True):
            raise ValueError("SigLIP vision towers without their attention-pooling head are not supported")
        self.vision_model = SiglipVisionTower(vision)

    def text_projection_of(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.text_model.head(hidden)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values)

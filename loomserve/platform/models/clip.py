"""The CLIP vision tower as LLaVA uses it: patch + class embeddings, pre-norm encoder layers, and the hidden
states of the chosen feature layer(s) (the class token dropped under the "default" strategy)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


class CLIPAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # [B, H, N, D]
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class CLIPMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.act = ACT2FN[act]
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        dim = config.hidden_size
        self.layer_norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(dim, config.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(dim, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPVisionTower(nn.Module):
    def __init__(self, config: Any, feature_layers: list[int], drop_cls: bool) -> None:
        super().__init__()
        dim = config.hidden_size
        self.image_size, self.patch = config.image_size, config.patch_size
        num_layers = config.num_hidden_layers
        # hidden_states[0] is the embedding output, hidden_states[i] the output of layer i - 1.
        self.feature_layers = [layer % (num_layers + 1) for layer in feature_layers]
        self.drop_cls = drop_cls
        self.embeddings = nn.Module()
        self.embeddings.class_embedding = nn.Parameter(torch.empty(dim))
        self.embeddings.patch_embedding = nn.Conv2d(config.num_channels, dim, self.patch, self.patch, bias=False)
        self.embeddings.position_embedding = nn.Embedding((self.image_size // self.patch) ** 2 + 1, dim)
        self.pre_layrnorm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(max(self.feature_layers)))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, tokens, dim * len(feature_layers)]."""
        if pixel_values.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"CLIP takes {self.image_size}x{self.image_size} images, got {tuple(pixel_values.shape)}")
        emb = self.embeddings
        patches = emb.patch_embedding(pixel_values.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = emb.class_embedding.expand(patches.shape[0], 1, -1)
        x = torch.cat([cls, patches], dim=1) + emb.position_embedding.weight  # [B, 1 + patches, dim]
        hidden = [self.pre_layrnorm(x)]
        for layer in self.encoder.layers:
            hidden.append(layer(hidden[-1]))
        selected = torch.cat([hidden[i] for i in self.feature_layers], dim=-1)
        return selected[:, 1:] if self.drop_cls else selected

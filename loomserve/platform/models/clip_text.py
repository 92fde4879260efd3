"""The text tower of CLIP and SigLIP over packed tokens: token + learned position embeddings, pre-norm layers,
a final LayerNorm. Each sequence attends to itself only (no KV cache): CLIP causally, SigLIP bidirectionally.

Modules are named as transformers names `text_model.*`, so checkpoint tensors load by name.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loomserve.platform.attention.encoder import EncoderAttention, SequenceLayout
from loomserve.platform.models.clip import CLIPMLP


def causal_attention(qkv: torch.Tensor, layout: SequenceLayout, scale: float) -> torch.Tensor:
    """Causal self-attention of each sequence over itself: qkv [T, 3, H, D] -> [T, H * D]. Sequences of one length
    run as one `[b, L]` block, so there is no padding and no mask beyond the causal one."""
    T, _, H, D = qkv.shape
    out = qkv.new_empty(T, H, D)
    for g in layout.groups:
        q, k, v = qkv.index_select(0, g.rows).view(g.b, g.L, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)  # [b, H, L, D]
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)  # [b, H, L, D]
        out.index_copy_(0, g.rows, attended.transpose(1, 2).reshape(g.b * g.L, H, D))
    return out.flatten(1)


class PackedSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, causal: bool) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.causal = num_heads, dim // num_heads, causal
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.attn = EncoderAttention(num_heads, self.head_dim, self.head_dim**-0.5)

    def forward(self, x: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
        qkv = torch.stack([p(x) for p in (self.q_proj, self.k_proj, self.v_proj)], dim=1)  # [T, 3, dim]
        qkv = qkv.view(x.shape[0], 3, self.num_heads, self.head_dim)  # [T, 3, H, D]
        if self.causal:
            return self.out_proj(causal_attention(qkv, layout, self.attn.scale))
        return self.out_proj(self.attn.forward(qkv, layout))


class PackedEncoderLayer(nn.Module):
    def __init__(self, config: Any, causal: bool) -> None:
        super().__init__()
        dim = config.hidden_size
        self.layer_norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.self_attn = PackedSelfAttention(dim, config.num_attention_heads, causal)
        self.layer_norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(dim, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), layout)
        return x + self.mlp(self.layer_norm2(x))


class TextTower(nn.Module):
    def __init__(self, config: Any, causal: bool) -> None:
        super().__init__()
        dim = config.hidden_size
        self.embeddings = nn.Module()
        self.embeddings.token_embedding = nn.Embedding(config.vocab_size, dim)
        self.embeddings.position_embedding = nn.Embedding(config.max_position_embeddings, dim)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(PackedEncoderLayer(config, causal)
                                            for _ in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
        """input_ids, positions [T] (0-based within each sequence) -> every token's final state [T, dim]."""
        emb = self.embeddings
        x = emb.token_embedding(input_ids) + emb.position_embedding(positions)
        for layer in self.encoder.layers:
            x = layer(x, layout)
        return self.final_layer_norm(x)

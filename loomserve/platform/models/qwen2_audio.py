"""Qwen2AudioForConditionalGeneration over packed tokens: the Whisper-style audio encoder (two convolutions,
pre-norm layers, 2x average pool), a linear projector, and a Qwen2 decoder; one embedding per `<|AUDIO|>`.

The encoder runs on the clip's own frames: transformers runs it on 30 s of features with the padding masked
out of attention, which gives the same outputs for the valid frames (see the audio processor for the
feature frames an item carries).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from loomserve.modalities.audio import encoder_lengths
from loomserve.modalities.inputs import MultiModalItem
from loomserve.platform.models.multimodal import MultiModalForCausalLM


class AudioAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj, self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q = (self.q_proj(x) * self.head_dim**-0.5).view(n, self.num_heads, -1).transpose(0, 1)  # scaled first
        k = self.k_proj(x).view(n, self.num_heads, -1).transpose(0, 1)
        v = self.v_proj(x).view(n, self.num_heads, -1).transpose(0, 1)
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # [H, N, D]
        return self.out_proj(out.transpose(0, 1).reshape(n, -1))


class AudioEncoderLayer(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        dim = config.d_model
        self.self_attn = AudioAttention(dim, config.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.act = ACT2FN[config.activation_function]
        self.fc1, self.fc2 = nn.Linear(dim, config.encoder_ffn_dim), nn.Linear(config.encoder_ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class Qwen2AudioEncoder(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        dim = config.d_model
        self.conv1 = nn.Conv1d(config.num_mel_bins, dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(config.max_source_positions, dim)
        self.layers = nn.ModuleList(AudioEncoderLayer(config) for _ in range(config.encoder_layers))
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor, num_frames: int) -> torch.Tensor:
        """[n_mels, F] features of a clip with `num_frames` valid frames -> [tokens, d_model]."""
        conv_len, tokens = encoder_lengths(num_frames)
        x = F.gelu(self.conv1(features[None].to(self.conv1.weight.dtype)))
        x = F.gelu(self.conv2(x))[0, :, :conv_len].T  # [conv_len, d_model]
        x = x + self.embed_positions.weight[:conv_len]
        for layer in self.layers:
            x = layer(x)
        x = F.avg_pool1d(x.T[None], kernel_size=2, stride=2)[0].T  # [conv_len // 2, d_model]
        return self.layer_norm(x[:tokens])


class Qwen2AudioProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class Qwen2AudioForConditionalGeneration(MultiModalForCausalLM):
    tower_prefixes = ("audio_tower", "multi_modal_projector")

    def __init__(self, hf_config: Any, attention_backend: str = "auto") -> None:
        super().__init__(hf_config, attention_backend)
        self.audio_tower = Qwen2AudioEncoder(hf_config.audio_config)
        self.multi_modal_projector = Qwen2AudioProjector(hf_config.audio_config.d_model,
                                                         hf_config.get_text_config().hidden_size)

    def encode(self, modality: str, items: list[MultiModalItem]) -> list[torch.Tensor]:
        device = self.audio_tower.conv1.weight.device
        return [self.multi_modal_projector(self.audio_tower(it.data["input_features"].to(device),
                                                            int(it.meta["num_frames"])))
                for it in items]

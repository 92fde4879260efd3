"""WhisperForConditionalGeneration over packed tokens: an audio encoder run once per request, and a decoder whose
layers attend to their own tokens through the paged KV cache and to the request's encoder output.

The encoder (two convolutions, pre-norm layers, final norm) reads the 30 s log-mel features of one clip
([n_mels, 3000]) and gives 1500 positions. `cross_kv` turns them into every decoder layer's cross-attention keys
and values at once; the cross-attention store (`platform/cross_kv_store.py`) keeps them for the request's life,
and each step's `ForwardBatch.cross_attn` carries the ones of its requests. Module names follow transformers'
(`model.encoder.*`, `model.decoder.*`, `proj_out` tied to the decoder's token embeddings), so tensors load by name.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from loomserve.modalities.inputs import MultiModalItem
from loomserve.platform.attention import get_attention_backend
from loomserve.platform.attention.cross import cross_attention
from loomserve.platform.forward_batch import ForwardBatch
from loomserve.platform.models.interfaces import ServedModel
from loomserve.platform.models.packing import load_packed_weights
from loomserve.platform.models.qwen2_audio import Qwen2AudioEncoder


class WhisperEncoder(Qwen2AudioEncoder):
    """The same convolutions, positions, layers and final norm as Qwen2-Audio's tower (which is Whisper's), run on
    the whole 30 s and without its pooling."""

    @property
    def num_frames(self) -> int:
        """Feature frames one clip must have: two per encoder position (the second convolution strides by 2)."""
        return 2 * self.embed_positions.num_embeddings

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[n_mels, num_frames] log-mel features of one clip -> [max_source_positions, d_model]."""
        if features.shape[-1] != self.num_frames:
            raise ValueError(f"Whisper takes {self.num_frames} feature frames, got {features.shape[-1]}")
        x = F.gelu(self.conv1(features[None].to(self.conv1.weight.dtype)))
        x = F.gelu(self.conv2(x))[0].T  # [positions, d_model]
        x = x + self.embed_positions.weight
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


class WhisperSelfAttention(nn.Module):
    """Causal self-attention over the request's own tokens through the paged KV cache (no rotary positions)."""

    def __init__(self, dim: int, num_heads: int, attention_backend: str) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj, self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.attn = get_attention_backend(attention_backend)(num_heads, num_heads, self.head_dim, self.head_dim**-0.5)

    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        shape = (-1, self.num_heads, self.head_dim)
        q, k, v = self.q_proj(x).view(shape), self.k_proj(x).view(shape), self.v_proj(x).view(shape)  # [T, H, D]
        return self.out_proj(self.attn.forward(q, k, v, kv_cache, batch.attn))


class WhisperCrossAttention(nn.Module):
    """Attention of the decoder's tokens over the encoder output; keys and values are made once per request."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj, self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)

    def keys_values(self, encoded: torch.Tensor) -> torch.Tensor:
        """[S, d_model] encoder output -> [2, S, H, D]."""
        shape = (encoded.shape[0], self.num_heads, self.head_dim)
        return torch.stack([self.k_proj(encoded).view(shape), self.v_proj(encoded).view(shape)])

    def forward(self, x: torch.Tensor, layer: int, batch: ForwardBatch) -> torch.Tensor:
        if batch.cross_attn is None:
            raise RuntimeError("a Whisper step needs its requests' cross-attention keys and values")
        q = self.q_proj(x).view(-1, self.num_heads, self.head_dim)  # [T, H, D]
        return self.out_proj(cross_attention(q, batch.cross_attn, layer, self.head_dim**-0.5))


class WhisperDecoderLayer(nn.Module):
    def __init__(self, config: Any, attention_backend: str) -> None:
        super().__init__()
        dim = config.d_model
        self.self_attn = WhisperSelfAttention(dim, config.decoder_attention_heads, attention_backend)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.encoder_attn = WhisperCrossAttention(dim, config.decoder_attention_heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(dim)
        self.act = ACT2FN[config.activation_function]
        self.fc1, self.fc2 = nn.Linear(dim, config.decoder_ffn_dim), nn.Linear(config.decoder_ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, layer: int, kv_cache: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), kv_cache, batch)
        x = x + self.encoder_attn(self.encoder_attn_layer_norm(x), layer, batch)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class WhisperDecoder(nn.Module):
    def __init__(self, config: Any, attention_backend: str) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.embed_positions = nn.Embedding(config.max_target_positions, config.d_model)
        self.layers = nn.ModuleList(WhisperDecoderLayer(config, attention_backend)
                                    for _ in range(config.decoder_layers))
        self.layer_norm = nn.LayerNorm(config.d_model)

    def forward(self, input_ids: torch.Tensor, kv_caches: list[torch.Tensor], batch: ForwardBatch) -> torch.Tensor:
        # transformers' decoder adds learned positions to the token embeddings and never applies `embed_scale`
        x = self.embed_tokens(input_ids) + self.embed_positions(batch.positions)  # [T, d_model]
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            x = layer(x, i, kv_cache, batch)
        return self.layer_norm(x)


class WhisperModel(nn.Module):
    def __init__(self, config: Any, attention_backend: str) -> None:
        super().__init__()
        self.encoder = WhisperEncoder(config)
        self.decoder = WhisperDecoder(config, attention_backend)


class WhisperForConditionalGeneration(ServedModel):
    is_multimodal = True  # its audio arrives as a media item, the encoder's input (no placeholder in the prompt)
    supports_lora = False
    pooling_tasks = ()
    encoder_only = False
    uses_mrope = False
    is_moe = False
    is_encoder_decoder = True
    language_model_prefix = "model.decoder."

    def __init__(self, hf_config: Any, attention_backend: str = "auto") -> None:
        super().__init__()
        self.config = hf_config
        self.model = WhisperModel(hf_config, attention_backend)
        self.proj_out = nn.Linear(hf_config.d_model, hf_config.vocab_size, bias=False)
        self.proj_out.weight = self.model.decoder.embed_tokens.weight  # always tied, as in transformers

    def encode(self, modality: str, items: list[MultiModalItem]) -> list[torch.Tensor]:
        """Each clip's encoder output [max_source_positions, d_model]."""
        device = self.model.encoder.conv1.weight.device
        return [self.model.encoder(item.data["input_features"].to(device)) for item in items]

    def cross_kv(self, encoded: torch.Tensor) -> torch.Tensor:
        """[S, d_model] encoder output -> every decoder layer's cross-attention keys and values [L, 2, S, H, D]."""
        return torch.stack([layer.encoder_attn.keys_values(encoded) for layer in self.model.decoder.layers])

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.decoder.embed_tokens(input_ids)  # [T, d_model]

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] decoder tokens
        kv_caches: list[torch.Tensor],  # per decoder layer [2, num_blocks, block_size, H, D]
        batch: ForwardBatch,  # positions [T]; cross_attn: the requests' cross-attention keys and values
    ) -> torch.Tensor:  # [T, d_model]
        return self.model.decoder(input_ids, kv_caches, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj_out(hidden).float()  # [N, vocab]

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_packed_weights(self, weights, self._param_for)

    @staticmethod
    def _param_for(name: str) -> tuple[str, None] | None:
        """Tensors load by name; `proj_out` is the decoder's token embedding (saved or not)."""
        return None if name == "proj_out.weight" else (name, None)

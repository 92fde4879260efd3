"""The EAGLE-3 draft head in its published layout (`LlamaForCausalLMEagle3`: the EAGLE repo, SGLang, vLLM).

One Llama decoder layer (`midlayer`) over packed tokens: its attention reads [input_layernorm(embeds) ;
hidden_norm(hidden)] (twice the hidden size), where `hidden` is either `fc` of the target's hidden states from
three chosen layers or the head's own previous output. Its LM head scores a draft vocabulary (`draft_vocab_size`
tokens) that `d2t` maps into the target's (target id = draft id + d2t[draft id]); `t2d`, the reverse mask, is not
needed. The token embeddings are the target's unless the checkpoint carries its own (`embed_tokens.weight`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from loomserve.platform.forward_batch import ForwardBatch
from loomserve.platform.models.decoder import DECODER_PACKED_MODULES, MLP, Attention, decoder_param_for, head_dim_of
from loomserve.platform.models.layers import RMSNorm
from loomserve.platform.models.linear import ParallelLMHead, QKVParallelLinear, VocabParallelEmbedding
from loomserve.platform.models.packing import load_packed_weights
from loomserve.platform.models.rope import RotaryEmbedding

ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")


class Eagle3Layer(nn.Module):
    def __init__(self, config: Any, attention_backend: str) -> None:
        super().__init__()
        hidden_size = config.hidden_size
        self.self_attn = Attention(config, attention_backend)
        attn = self.self_attn
        # Queries, keys and values read the embeddings and the hidden state side by side: 2 * hidden inputs.
        attn.qkv_proj = QKVParallelLinear(2 * hidden_size, attn.head_dim, config.num_attention_heads,
                                          getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                                          bias=getattr(config, "attention_bias", False))
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(hidden_size, config.rms_norm_eps)
        self.hidden_norm = RMSNorm(hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, config.rms_norm_eps)
        # Some heads were trained with the normed hidden state as the skip stream.
        self.norm_before_residual = bool(getattr(config, "norm_before_residual", False))

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, cos_sin: torch.Tensor, kv_cache: torch.Tensor,
                batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        normed = self.hidden_norm(hidden)
        residual = normed if self.norm_before_residual else hidden
        x = torch.cat([self.input_layernorm(embeds), normed], dim=-1)  # [T, 2 * hidden]
        x = self.self_attn(x, cos_sin, kv_cache, batch)  # [T, hidden]
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x, batch), residual


class Eagle3Head(nn.Module):
    packed_modules_mapping = DECODER_PACKED_MODULES

    def __init__(self, config: Any, aux_input_size: int, max_positions: int, own_embeddings: bool,
                 attention_backend: str = "auto") -> None:
        super().__init__()
        self.vocab_size = config.vocab_size
        self.draft_vocab_size = getattr(config, "draft_vocab_size", None) or config.vocab_size
        self.fc = nn.Linear(aux_input_size, config.hidden_size, bias=False)
        self.midlayer = Eagle3Layer(config, attention_backend)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = ParallelLMHead(config.hidden_size, self.draft_vocab_size)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size) if own_embeddings else None
        self.rotary_emb = RotaryEmbedding(config, head_dim_of(config), max_positions)
        self.d2t = nn.Buffer(torch.zeros(self.draft_vocab_size, dtype=torch.long))  # draft id -> target id offset

    def combine(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        """The target's chosen layers' hidden states [T, layers * target hidden] -> the head's input [T, hidden]."""
        return self.fc(aux_hidden)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, kv_cache: torch.Tensor,
                batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """embeds [T, hidden] of the tokens one past the positions, hidden [T, hidden] -> (normed output for the
        logits [T, hidden], pre-norm output, the next draft step's hidden [T, hidden])."""
        cos_sin = self.rotary_emb(batch.positions)
        x, residual = self.midlayer(embeds, hidden, cos_sin, kv_cache, batch)
        return self.norm(x, residual)

    def compute_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, target vocab] float32: the draft vocabulary's logits at their target ids, -inf
        elsewhere (no draft proposes a token outside it)."""
        draft = self.lm_head(normed).float()  # [N, draft vocab]
        logits = draft.new_full((draft.shape[0], self.vocab_size), float("-inf"))
        target_ids = torch.arange(self.draft_vocab_size, device=draft.device) + self.d2t
        logits[:, target_ids] = draft
        return logits

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_packed_weights(self, self._take_vocab_map(weights), self._param_for)

    def _take_vocab_map(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The weights without the vocabulary maps, loading `d2t` on the way."""
        for name, tensor in weights:
            if name.endswith("d2t"):
                self.d2t.copy_(tensor[:])
            elif not name.endswith("t2d"):
                yield name, tensor

    def _param_for(self, name: str) -> tuple[str, int | None] | None:
        """Checkpoint names: `midlayer.` (EAGLE, SGLang) or `layers.0.` (vLLM's speculators), with or without a
        leading `model.`."""
        name = name.removeprefix("model.").replace("layers.0.", "midlayer.")
        if name == "embed_tokens.weight" and self.embed_tokens is None:
            return None
        return decoder_param_for(name, tied_lm_head=False)

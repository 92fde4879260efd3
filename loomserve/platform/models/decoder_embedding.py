"""Decoder-based embedders (Qwen3-Embedding style): a decoder's final hidden states, pooled by the runner.

Serves `Qwen3Model`-style checkpoints (base-model tensor names, no LM head) and causal-LM checkpoints loaded for
the embed task; either way no LM head is built.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from loomserve.platform.models.decoder import DecoderForCausalLM, DecoderModel


class DecoderForEmbedding(DecoderForCausalLM):
    """The causal LM's modules minus its LM head: `forward` gives hidden states [T, hidden]."""

    def __init__(self, hf_config: Any, attention_backend: str = "auto") -> None:
        nn.Module.__init__(self)  # not DecoderForCausalLM.__init__: it would build the LM head
        self.config = hf_config
        self.model = DecoderModel(hf_config, attention_backend)
        self.tie_word_embeddings = False

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise ValueError("an embedding model has no LM head: it cannot generate")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Base-model tensors with or without the `model.` prefix; an LM head in the checkpoint is left out."""
        renamed = (
            (name if name.startswith("model.") else f"model.{name}", tensor)
            for name, tensor in weights
            if not name.startswith("lm_head.")
        )
        return super().load_weights(renamed)

"""Decoder-based embedders (Qwen3-Embedding style): a decoder's final hidden states, pooled by the runner.

Serves `Qwen3Model`-style checkpoints (base-model tensor names, no LM head) and causal-LM checkpoints loaded for
the embed task; either way no LM head is built.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any

import torch

from loomserve.platform.models.decoder import DECODER_PACKED_MODULES, DecoderModel, decoder_param_for
from loomserve.platform.models.interfaces import ServedModel
from loomserve.platform.models.packing import load_packed_weights


class DecoderForEmbedding(ServedModel):
    """A `DecoderModel` under `model.` (the causal LM's names, so LoRA adapters fit): hidden states [T, hidden]."""

    is_multimodal = False
    supports_lora = True
    pooling_tasks = ("embed",)
    encoder_only = False
    uses_mrope = False
    is_moe = False
    packed_modules_mapping = DECODER_PACKED_MODULES

    def __init__(self, hf_config: Any, attention_backend: str = "auto") -> None:
        super().__init__()
        self.config = hf_config
        self.model = DecoderModel(hf_config, attention_backend)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:  # [T, hidden]
        # Exactly the decoder's inputs: whatever the decoder takes, the embedder takes.
        return self.model(*args, **kwargs)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Base-model tensors with or without the `model.` prefix; an LM head in the checkpoint is left out."""
        renamed = (
            (name if name.startswith("model.") else f"model.{name}", tensor)
            for name, tensor in weights
            if not name.startswith("lm_head.")
        )
        return load_packed_weights(self, renamed, partial(decoder_param_for, tied_lm_head=False))

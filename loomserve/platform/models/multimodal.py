"""What every vision/audio-language model shares: a decoder LM fed with `inputs_embeds`, towers that
encode media items, and loading of both from one checkpoint.

Checkpoints name the language model's tensors in several layouts (transformers 5 `model.language_model.*`,
LLaVA-style `language_model.model.*`, Qwen2-VL-style `model.layers.*`); all are mapped onto the inner
`DecoderForCausalLM`, which fuses its projections as usual. Tower and projector tensors load by name.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from loomserve.modalities.inputs import MultiModalItem
from loomserve.platform.forward_batch import ForwardBatch
from loomserve.platform.models.decoder import DECODER_PACKED_MODULES, DecoderForCausalLM, decoder_param_for
from loomserve.platform.models.interfaces import ServedModel
from loomserve.platform.models.packing import load_packed_weights


class MultiModalForCausalLM(ServedModel):
    is_multimodal = True
    supports_lora = True
    pooling_tasks = ()
    encoder_only = False
    uses_mrope = False
    is_moe = False
    packed_modules_mapping = DECODER_PACKED_MODULES
    language_model_prefix = "language_model."  # LoRA and NF4 touch the language model only, as in vLLM
    tower_prefixes: tuple[str, ...] = ()  # first name components of non-LM checkpoint tensors

    def __init__(self, hf_config: Any, attention_backend: str) -> None:
        super().__init__()
        self.config = hf_config
        text = hf_config.get_text_config()
        self.language_model = DecoderForCausalLM(text, attention_backend)
        lm = self.language_model
        if getattr(hf_config, "tie_word_embeddings", False) and not lm.tie_word_embeddings:
            lm.tie_word_embeddings = True
            lm.lm_head.weight = lm.model.embed_tokens.weight

    def encode(self, modality: str, items: list[MultiModalItem]) -> list[torch.Tensor]:
        """Each item's embeddings, [item.placeholder.length, text hidden size], in the model dtype."""
        raise NotImplementedError

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(input_ids)  # [T, hidden]

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        kv_caches: list[torch.Tensor],
        batch: ForwardBatch,  # positions [T], or [3, T] for M-RoPE models; inputs_embeds [T, hidden] with media
    ) -> torch.Tensor:  # [T, hidden]
        return self.language_model(input_ids, kv_caches, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    def skips_weight(self, name: str) -> bool:
        """Checkpoint tensors the model does not use (e.g. vision layers past the feature layer)."""
        return False

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_packed_weights(self, weights, self._param_for)

    def _param_for(self, checkpoint_name: str) -> tuple[str, int | None] | None:
        """A checkpoint tensor's (parameter, shard): the language model's own mapping under its prefix, towers and
        projector as named; None for what the model does not use."""
        name = self.canonical_name(checkpoint_name)
        if name.startswith("language_model."):
            target = decoder_param_for(name.removeprefix("language_model."), self.language_model.tie_word_embeddings)
            return None if target is None else ("language_model." + target[0], target[1])
        return None if self.skips_weight(name) else (name, None)

    def canonical_name(self, name: str) -> str:
        """Any checkpoint layout -> this module's names (`language_model.model.*`, `language_model.lm_head.*`,
        tower and projector names as they are)."""
        head, _, rest = name.partition(".")
        if head == "model":
            first = rest.partition(".")[0]
            if first == "language_model":
                return "language_model.model." + rest.removeprefix("language_model.")
            if first in self.tower_prefixes:
                return rest
            return "language_model." + name  # Qwen2-VL-style `model.layers.*`
        if head == "lm_head":
            return "language_model." + name
        if head == "language_model" and not rest.startswith(("model.", "lm_head.")):
            return "language_model.model." + rest
        return name

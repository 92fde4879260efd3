"""What CLIP and SigLIP embedding models share: two towers into one embedding space, served for the embed task.

A text prompt runs the text tower; every token's final state goes through the text projection, and the pooler
takes the last one (the EOS the tokenizer appends: what transformers' `get_text_features` pools). An image prompt is
one placeholder token (the image alone, as in vLLM); the multimodal runner hook has the image tower encode the image
into its final projected embedding and puts it in that token's row of `inputs_embeds`, named by `media_rows`, which
`forward` returns in place of the text tower's output. So text and image prompts share a step, each pooled as alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from loomserve.modalities.inputs import MultiModalItem
from loomserve.platform.attention.encoder import SequenceLayout
from loomserve.platform.forward_batch import ForwardBatch
from loomserve.platform.models.clip_text import TextTower
from loomserve.platform.models.interfaces import ServedModel
from loomserve.platform.models.packing import load_packed_weights


class ImageTextEmbeddingModel(ServedModel):
    """Subclasses add their image tower and projections, and implement `text_projection_of` and `image_features`."""

    is_multimodal = True
    supports_lora = False  # LoRA adapts decoder layers only
    pooling_tasks = ("embed",)
    encoder_only = True
    uses_mrope = False
    is_moe = False
    language_model_prefix = "text_model."  # the text tower is what NF4 would quantize; the image tower stays
    skipped_prefixes: tuple[str, ...] = ("logit_scale", "logit_bias")  # the contrastive loss's, not the towers'

    def __init__(self, hf_config: Any, causal_text: bool, embed_dim: int) -> None:
        super().__init__()
        self.config = hf_config
        self.embed_dim = embed_dim  # the width of both towers' embeddings
        self.text_model = TextTower(hf_config.text_config, causal_text)

    def text_projection_of(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, text hidden] final states -> [T, embed_dim]."""
        raise NotImplementedError

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, embed_dim], as transformers' `get_image_features`."""
        raise NotImplementedError

    def encode(self, modality: str, items: list[MultiModalItem]) -> list[torch.Tensor]:
        """Each image's embedding as its one placeholder token's row: [1, embed_dim] each."""
        device = self.text_model.embeddings.token_embedding.weight.device
        pixels = torch.stack([it.data["pixel_values"] for it in items]).to(device)  # [B, 3, S, S]
        return list(self.image_features(pixels)[:, None])

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The rows media embeddings are written into ([T, embed_dim]); the text tower embeds text itself."""
        weight = self.text_model.embeddings.token_embedding.weight
        return weight.new_zeros(input_ids.shape[0], self.embed_dim)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        kv_caches: list[torch.Tensor],  # unused: whole prompts in one step, no KV cache
        batch: ForwardBatch,  # positions [T] 0-based within each prompt; inputs_embeds/media_rows with images
    ) -> torch.Tensor:  # [T, embed_dim]
        weight = self.text_model.embeddings.token_embedding.weight
        layout = SequenceLayout(batch.attn.query_start_loc_cpu, weight.device, weight.dtype)
        out = self.text_projection_of(self.text_model(input_ids, batch.positions, layout))
        if batch.media_rows is not None:  # an image prompt's one token: its image embedding, not the text tower's
            out.index_copy_(0, batch.media_rows, batch.inputs_embeds.index_select(0, batch.media_rows))
        return out

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_packed_weights(self, weights, self._param_for)

    def _param_for(self, name: str) -> tuple[str, int | None] | None:
        if name.startswith(self.skipped_prefixes) or name.endswith(".position_ids"):
            return None
        return self.canonical_name(name), None

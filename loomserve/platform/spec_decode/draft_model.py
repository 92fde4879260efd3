"""The draft-model proposer: a second, smaller checkpoint with the target's tokenizer drafts k tokens per request.

Every step the draft runs over the same flat batch as the target (same slots, same attention metadata, no adapter,
no media embeddings), so its cache holds whatever the target's does, prefix-cache hits included. Once a step's
tokens land, it decodes k times from each request's last token (`model_proposer.py`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from loomserve.platform.forward_batch import ForwardBatch
from loomserve.platform.spec_decode.model_proposer import ModelProposer

if TYPE_CHECKING:
    from loomserve.platform.config import EngineConfig, SpeculativeConfig
    from loomserve.platform.input_batch import BatchInputs, RequestState
    from loomserve.platform.spec_decode.proposer import LandedStep


class DraftModelProposer(ModelProposer):
    def __init__(self, spec: SpeculativeConfig, config: EngineConfig, device: torch.device) -> None:
        from transformers import AutoConfig

        from loomserve.platform.loader import load_model

        mc = config.model_config
        self.model_config = dataclasses.replace(
            mc, model=spec.model, tokenizer=spec.model, hf_config=AutoConfig.from_pretrained(spec.model),
            quantization=None, task="generate", encoder_only=False, pooler_config=None,
        )
        self.model = load_model(self.model_config, config.attention_backend)
        dc = self.model_config
        super().__init__(dc.num_layers, dc.num_kv_heads, dc.head_dim, dc.dtype, dc.vocab_size,
                         config.cache_config.block_size, device)

    @torch.inference_mode()
    def prepare(self, batch: BatchInputs) -> None:
        """Run the draft over the step's tokens (its KV follows the target's)."""
        forward = batch.forward
        self.model(batch.input_ids, self.kv_caches, ForwardBatch(forward.attn, forward.positions))
        super().prepare(batch)

    def _first_logits(self, rows: list[RequestState], landed: LandedStep) -> torch.Tensor:
        self._start_drafting(rows)
        tokens = torch.tensor([s.output_token_ids[-1] for s in rows], device=self.device)  # [R]
        return self._next_logits(tokens, 0)

    def _next_logits(self, tokens: torch.Tensor, j: int) -> torch.Tensor:
        """The draft decodes `tokens` [R] at each request's last position + j."""
        positions = torch.tensor([p + j for p in self._last], device=self.device)  # [R]
        attn = self._decode_attention(positions, self._rows_tables, [p + j + 1 for p in self._last])
        hidden = self.model(tokens, self.kv_caches, ForwardBatch(attn, positions))
        return self.model.compute_logits(hidden).float()

"""The one per-step argument of a model's forward: everything about the step beyond the token ids and KV caches.

It goes down through the model as an explicit argument, to every layer that needs part of it (attention its
metadata, adapted linears the step's LoRA batch), so no module keeps per-step state between forwards. The runner
builds one per step; a CUDA graph is captured with its own, built over its static buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from loomserve.platform.attention import AttentionMetadata

if TYPE_CHECKING:  # platform knows the adapters' data type only, never their behaviour
    from loomserve.adapters.layers import LoRABatch
    from loomserve.platform.attention.cross import CrossAttentionBatch
    from loomserve.platform.spec_decode.aux_hidden import AuxHiddenStates


@dataclass
class ForwardBatch:
    attn: AttentionMetadata
    positions: torch.Tensor  # [T] int64, or [3, T] int64 for M-RoPE models (Qwen2-VL)
    lora: LoRABatch | None = None  # the step's tokens grouped by adapter slot; None when no token uses an adapter
    inputs_embeds: torch.Tensor | None = None  # [T, hidden]: token embeddings with media embeddings in place
    token_type_ids: torch.Tensor | None = None  # [T] int64 segment ids (cross-encoder pairs)
    media_rows: torch.Tensor | None = None  # [M] int64: the rows of inputs_embeds that hold media embeddings
    cross_attn: CrossAttentionBatch | None = None  # encoder-decoder models: the requests' cross-attention K/V
    aux_hidden: AuxHiddenStates | None = None  # EAGLE-3: where a decoder copies the inputs of chosen layers

    @property
    def has_extra_inputs(self) -> bool:
        """Whether the step carries inputs a CUDA graph does not take (media embeddings, token types, cross K/V)."""
        return self.inputs_embeds is not None or self.token_type_ids is not None or self.cross_attn is not None

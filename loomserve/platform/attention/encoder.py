"""Bidirectional attention for encoder-only models over a packed batch, with no KV cache.

Each sequence attends to all of its own tokens and to nothing else. The packed tokens are gathered once per step
into a padded `[B, L]` layout (L = the longest sequence) with a key-padding mask, so every layer runs one
scaled_dot_product_attention call; linear layers stay on the packed tokens, where padding would cost the most.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PaddedLayout:
    """Where each packed token sits in a padded `[B, L]` batch."""

    index: torch.Tensor  # [B, L] int64: packed index of each slot (0 in padding slots)
    valid: torch.Tensor  # [B, L] bool: the slot holds a token

    @classmethod
    def from_query_start_loc(cls, query_start_loc: list[int], device: torch.device) -> PaddedLayout:
        starts = torch.tensor(query_start_loc[:-1], dtype=torch.long)
        lengths = torch.tensor(query_start_loc[1:], dtype=torch.long) - starts
        offsets = torch.arange(int(lengths.max()), dtype=torch.long)
        valid = offsets[None, :] < lengths[:, None]  # [B, L]
        index = torch.where(valid, starts[:, None] + offsets[None, :], 0)
        return cls(index.to(device), valid.to(device))


class EncoderAttention:
    """Full (non-causal) self-attention of each sequence over itself."""

    def __init__(self, num_heads: int, head_dim: int, scale: float) -> None:
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale

    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, H, D]
        v: torch.Tensor,  # [T, H, D]
        layout: PaddedLayout,
    ) -> torch.Tensor:  # [T, H * D]
        mask = layout.valid[:, None, None, :]  # [B, 1, 1, L]: padded keys get no weight
        q, k, v = (x[layout.index].transpose(1, 2) for x in (q, k, v))  # [B, H, L, D]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return out.transpose(1, 2)[layout.valid].flatten(1)  # back to the packed order

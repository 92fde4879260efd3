"""Cross-attention of a decoder over its request's encoder output (encoder-decoder models such as Whisper).

Each request's cross-attention keys and values are computed once from its encoder output and kept for its life
(`platform/cross_kv_store.py`); a step carries the ones of its requests in batch order. Every query token attends,
without a mask, to all encoder positions of its own request.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class CrossAttentionBatch:
    query_start_loc: list[int]  # [B + 1] host: where each request's tokens start in the packed batch
    keys_values: list[torch.Tensor]  # per request [layers, 2, S, H, D]: its encoder positions' keys and values


def cross_attention(q: torch.Tensor, batch: CrossAttentionBatch, layer: int, scale: float) -> torch.Tensor:
    """q [T, H, D] of the packed batch -> [T, H * D], each request's queries over its own keys and values."""
    out = torch.empty_like(q)
    qsl = batch.query_start_loc
    for i, kv in enumerate(batch.keys_values):
        k, v = kv[layer].transpose(1, 2)  # [H, S, D] each
        rows = q[qsl[i] : qsl[i + 1]].transpose(0, 1)  # [H, n, D]
        out[qsl[i] : qsl[i + 1]] = F.scaled_dot_product_attention(rows, k, v, scale=scale).transpose(0, 1)
    return out.flatten(1)

"""Bidirectional attention for encoder towers: over packed segments (frames, windows) or a padded batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int], scale: float
) -> torch.Tensor:
    """q, k, v [N, H, D] packed segments [bounds[i], bounds[i + 1]) that attend only within themselves ->
    [N, H * D]."""
    out = torch.empty_like(q)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            seg = [x[start:end].transpose(0, 1)[None] for x in (q, k, v)]  # [1, H, n, D]
            out[start:end] = F.scaled_dot_product_attention(*seg, scale=scale)[0].transpose(0, 1)
    return out.flatten(1)

"""Multimodal RoPE (Qwen2-VL family): three position rows (temporal, height, width) per token.

Text tokens have the same position in all three rows, counting on from the previous item; an image or
video's tokens take their (t, h, w) place in its merged-patch grid, offset by where the item starts. The
next text position is the item's start plus its larger spatial side, as transformers' `get_rope_index`
computes it; generated tokens continue from the prompt at `index + delta`. The rotary frequencies of
each head-dim slice come from one row, chosen by `mrope_section`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from loomserve.platform.models.rope import compute_inv_freq, rope_parameters


@dataclass
class MRopeGrid:
    """Where one image or video sits in the prompt and its grid in merged patches."""

    offset: int
    t: int
    h: int
    w: int
    time_interval: float = 1.0  # temporal position step per temporal patch (Qwen2.5-VL videos)


@dataclass
class MRopePositions:
    prompt: np.ndarray  # [3, P] int64
    delta: int  # a token at index i >= P has position i + delta in every row


def mrope_positions(num_prompt_tokens: int, grids: Sequence[MRopeGrid]) -> MRopePositions:
    rows = []
    index = position = 0
    for g in sorted(grids, key=lambda g: g.offset):
        text = g.offset - index
        rows.append(np.broadcast_to(np.arange(position, position + text), (3, text)))
        position += text
        temporal = (torch.arange(g.t) * g.time_interval).long().numpy()  # float32 product, then truncate
        t, h, w = np.meshgrid(temporal, np.arange(g.h), np.arange(g.w), indexing="ij")
        rows.append(np.stack([t.ravel(), h.ravel(), w.ravel()]) + position)
        position += max(g.h, g.w)
        index = g.offset + g.t * g.h * g.w
    text = num_prompt_tokens - index
    rows.append(np.broadcast_to(np.arange(position, position + text), (3, text)))
    prompt = np.concatenate(rows, axis=1).astype(np.int64)
    return MRopePositions(prompt, int(prompt.max()) + 1 - num_prompt_tokens)


def chunk_positions(mrope: MRopePositions, start: int, end: int) -> np.ndarray:
    """[3, end - start] positions of tokens [start, end), generated tokens included."""
    num_prompt = mrope.prompt.shape[1]
    cut = min(max(start, num_prompt), end)
    tail = np.arange(cut, end) + mrope.delta
    return np.concatenate([mrope.prompt[:, start:cut], np.broadcast_to(tail, (3, end - cut))], axis=1)


class MRotaryEmbedding(nn.Module):
    """[3, T] positions -> [T, rotary_dim] cos|sin rows in the layout `apply_rotary` takes."""

    def __init__(self, config: Any, head_dim: int) -> None:
        super().__init__()
        inv_freq, scaling = compute_inv_freq(config, head_dim)
        section = rope_parameters(config).get("mrope_section") or [16, 24, 24]
        if sum(section) != inv_freq.numel():
            raise ValueError(f"mrope_section {section} must sum to rotary_dim / 2 = {inv_freq.numel()}")
        self.attention_scaling = scaling
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        row = torch.cat([torch.full((n,), i % 3) for i, n in enumerate(section)])  # [rotary_dim / 2]
        self.row_of_dim = nn.Buffer(row, persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        if positions.ndim == 1:
            positions = positions.expand(3, -1)
        freqs = positions[..., None].float() * self.inv_freq  # [3, T, rotary_dim / 2]
        freqs = freqs.gather(0, self.row_of_dim.expand(1, freqs.shape[1], -1))[0]  # [T, rotary_dim / 2]
        return torch.cat([freqs.cos(), freqs.sin()], dim=-1) * self.attention_scaling

"""Bidirectional attention for encoder-only models over a packed batch, with no KV cache.

Each sequence attends to all of its own tokens and to nothing else. Once per step the sequences are sorted by length
and cut into groups of similar length; each group is gathered into a padded `[b, L]` block (a key-padding mask hides
the padding) and runs one scaled_dot_product_attention call per layer. Grouping keeps the padding, and so the wasted
attention work, within GROUP_PADDING of the group's tokens; linear layers never see padding at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

GROUP_PADDING = 1.25  # a group's padded slots may be at most this many times its tokens


@dataclass
class PaddedGroup:
    """Sequences of similar length, padded to the longest of them: b sequences, L slots each."""

    slot_rows: torch.Tensor  # [b * L] int64: the packed row each slot reads (row 0 for padding slots)
    mask: torch.Tensor | None  # [b, 1, 1, L] bool: keys that are tokens; None when no slot is padding
    token_slots: torch.Tensor | None  # [n] int64: the slots holding tokens, in packed order; None: all of them
    rows: torch.Tensor  # [n] int64: the packed rows of the group's tokens, in the same order
    b: int
    L: int


@dataclass
class PaddedLayout:
    groups: list[PaddedGroup]

    @classmethod
    def from_query_start_loc(cls, query_start_loc: list[int], device: torch.device) -> PaddedLayout:
        """`query_start_loc` [B + 1]: where each sequence's tokens start in the packed batch."""
        starts = query_start_loc[:-1]
        lengths = [end - start for start, end in zip(starts, query_start_loc[1:])]
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        groups, members, tokens = [], [], 0
        for i in order:
            if members and (len(members) + 1) * lengths[members[0]] > GROUP_PADDING * (tokens + lengths[i]):
                groups.append(_group([starts[j] for j in members], [lengths[j] for j in members], device))
                members, tokens = [], 0
            members.append(i)
            tokens += lengths[i]
        groups.append(_group([starts[j] for j in members], [lengths[j] for j in members], device))
        return cls(groups)


def _group(starts: list[int], lengths: list[int], device: torch.device) -> PaddedGroup:
    b, L = len(lengths), max(lengths)
    offsets = torch.arange(L, dtype=torch.long)
    valid = offsets[None, :] < torch.tensor(lengths, dtype=torch.long)[:, None]  # [b, L]
    slot_rows = torch.where(valid, torch.tensor(starts, dtype=torch.long)[:, None] + offsets[None, :], 0)
    full = bool(valid.all())
    return PaddedGroup(
        slot_rows=slot_rows.flatten().to(device),
        mask=None if full else valid[:, None, None, :].to(device),
        token_slots=None if full else valid.flatten().nonzero().squeeze(1).to(device),
        rows=slot_rows[valid].to(device),
        b=b,
        L=L,
    )


class EncoderAttention:
    """Full (non-causal) self-attention of each sequence over itself."""

    def __init__(self, num_heads: int, head_dim: int, scale: float) -> None:
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale

    def forward(self, qkv: torch.Tensor, layout: PaddedLayout) -> torch.Tensor:
        """qkv [T, 3, H, D] -> [T, H * D]."""
        T, _, H, D = qkv.shape
        out = qkv.new_empty(T, H, D)
        for g in layout.groups:
            padded = qkv.index_select(0, g.slot_rows).view(g.b, g.L, 3, H, D)
            q, k, v = padded.permute(2, 0, 3, 1, 4).unbind(0)  # [b, H, L, D] each
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=g.mask, scale=self.scale)
            attended = attended.transpose(1, 2).reshape(g.b * g.L, H, D)
            out.index_copy_(0, g.rows, attended if g.token_slots is None else attended.index_select(0, g.token_slots))
        return out.flatten(1)

"""Where the reference backend's batched sequences (decodes, short chunks) read their keys, built once per step.

Every layer of a step attends over the same positions; only the cache tensor differs. So the flat KV slot of every
key position, the causal mask and the query rows are computed once (on first use) and kept on the step's metadata;
each layer then reads its keys and values with one `index_select` each. A position past a sequence's end reads the
sequence's own first slot (written: a finite value) and is masked out, so it adds exactly zero: no gathered copy to
zero out per layer, and the result is the same as attending over the sequence alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loomserve.platform.attention.metadata import AttentionMetadata


@dataclass
class BatchedLayout:
    """b sequences, each with at most Q new tokens over at most L positions."""

    slots: torch.Tensor  # [b * L] int64: the cache slot each key position reads
    mask: torch.Tensor  # [b, 1, Q, L] bool: which keys each query sees
    rows: torch.Tensor  # [b, Q] int64: each query's row in the step's batch (padding queries clamped into range)
    real: torch.Tensor  # [b, Q] bool: the queries that are the sequences' tokens, not padding
    b: int
    L: int
    first_row: int | None  # when every sequence runs one token, in a run of rows from here (the decodes): no gather


def batched_layout(meta: AttentionMetadata, seqs: list[int], block_size: int, num_rows: int) -> BatchedLayout:
    """The layout of the sequences `seqs` of a step of `num_rows` tokens, cached on the step's metadata."""
    key = (seqs[0], len(seqs), block_size)  # a draft model may run over the same step with its own cache
    layout = meta.derived.get(key)
    if layout is None:
        layout = meta.derived[key] = _build(meta, seqs, block_size, num_rows)
    return layout


def _build(meta: AttentionMetadata, seqs: list[int], block_size: int, num_rows: int) -> BatchedLayout:
    qsl = meta.query_start_loc_cpu
    q_lens = [qsl[i + 1] - qsl[i] for i in seqs]
    seq_lens = [meta.seq_lens_cpu[i] for i in seqs]
    width, max_len = max(q_lens), max(seq_lens)
    device = meta.block_tables.device
    tables = meta.block_tables[seqs, : -(-max_len // block_size)]  # [b, blocks]
    starts = torch.tensor([qsl[i] for i in seqs], device=device)  # [b]
    lens = torch.tensor([q_lens, seq_lens], device=device)  # [2, b]
    keys = torch.arange(max_len, device=device)  # [L]
    in_seq = keys[None, :] < lens[1, :, None]  # [b, L]
    pos = torch.where(in_seq, keys[None, :], 0)  # [b, L]: past the end, the sequence's first position
    slots = tables.long().gather(1, pos // block_size) * block_size + pos % block_size  # [b, L]
    j = torch.arange(width, device=device)
    real = j[None, :] < lens[0, :, None]  # [b, Q]: query j is one of the sequence's new tokens
    q_pos = lens[1, :, None] - lens[0, :, None] + j[None, :]  # [b, Q] its position
    # A padding query sees key 0 only, so its (discarded) row stays finite.
    mask = (keys[None, None, :] <= q_pos[:, :, None]) & real[:, :, None] | (keys == 0)  # [b, Q, L]
    rows = (starts[:, None] + j[None, :]).clamp_max_(num_rows - 1)  # [b, Q]
    first_row = qsl[seqs[0]] if width == 1 and seqs[-1] - seqs[0] == len(seqs) - 1 else None
    return BatchedLayout(slots.flatten(), mask[:, None], rows, real, len(seqs), max_len, first_row)

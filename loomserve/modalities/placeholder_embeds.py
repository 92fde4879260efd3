"""A step's input embeddings with items' rows at their placeholder positions: what media encoders and prompt_embeds
both feed the decoder in place of the token embedding lookup. A prefill chunk may hold only part of an item."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from loomserve.modalities.inputs import MultiModalItem

if TYPE_CHECKING:
    from loomserve.platform.input_batch import BatchInputs


def with_placeholder_embeds(
    batch: BatchInputs,
    embed_input_ids: Callable[[torch.Tensor], torch.Tensor],
    rows_of: Callable[[MultiModalItem], torch.Tensor | None],
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(inputs_embeds [T, hidden], the index [M] of the rows that came from items), or None when no item's
    placeholder falls in this step. `rows_of(item)`: its embeddings [item.placeholder.length, hidden], None to skip."""
    rows, embeds = [], []
    offset = 0
    for s, state in zip(batch.scheduled, batch.requests):
        start, end = s.start, s.start + s.num_new_tokens
        for item in state.mm_items:
            p = item.placeholder
            lo, hi = max(start, p.offset), min(end, p.end)
            values = rows_of(item) if lo < hi else None
            if values is not None:
                embeds.append(values[lo - p.offset : hi - p.offset])
                rows.append(torch.arange(offset + lo - start, offset + hi - start))
        offset += s.num_new_tokens
    if not embeds:
        return None
    inputs_embeds = embed_input_ids(batch.input_ids)  # [T, hidden]
    # non-blocking: a blocking copy would wait for the step in flight
    index = torch.cat(rows).to(inputs_embeds.device, non_blocking=True)  # [M]
    values = torch.cat(embeds).to(inputs_embeds.device, inputs_embeds.dtype, non_blocking=True)  # [M, hidden]
    inputs_embeds.index_copy_(0, index, values)
    return inputs_embeds, index

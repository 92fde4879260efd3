"""The pooling side of a step's flat batch: where each finishing pooling request's tokens are, and the segment ids
that cross-encoder pairs feed to the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loomserve.platform.scheduler import ScheduledRequest
from loomserve.pooling.params import PoolingParams


@dataclass
class PoolingSpan:
    """A pooling request whose prompt ends in this step, and the rows of its tokens in the batch."""

    request_id: str
    start: int  # first row of this step's tokens of the request in the flat batch
    end: int
    params: PoolingParams  # CLS / MEAN / ALL / STEP spans hold the whole prompt (the scheduler runs them whole)


def pooling_spans(scheduled: list[ScheduledRequest], query_start_loc: list[int]) -> list[PoolingSpan]:
    """`scheduled` in batch order, `query_start_loc` [B + 1] its row offsets."""
    return [
        PoolingSpan(s.request.request_id, query_start_loc[i], query_start_loc[i + 1], s.request.pooling_params)
        for i, s in enumerate(scheduled)
        if s.pools
    ]


def token_type_ids(scheduled: list[ScheduledRequest], device: torch.device) -> torch.Tensor | None:
    """[T] int64 segment ids of the batch, or None when no request carries any (all zeros)."""
    if not any(s.request.pooling_params is not None and s.request.pooling_params.token_type_ids for s in scheduled):
        return None
    ids: list[int] = []
    for s in scheduled:
        params = s.request.pooling_params
        start = s.request.num_computed_tokens
        if params is not None and params.token_type_ids:
            ids.extend(params.token_type_ids[start : start + s.num_new_tokens])
        else:
            ids.extend([0] * s.num_new_tokens)
    return torch.tensor(ids, dtype=torch.long, device=device)

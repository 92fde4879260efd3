"""The pooling side of a step's flat batch: where each finishing pooling request's tokens are, and the segment ids
that cross-encoder pairs feed to the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from loomserve.platform.sampler import to_device
from loomserve.pooling.params import PoolingParams

if TYPE_CHECKING:
    from loomserve.platform.input_batch import RequestState


@dataclass
class PoolingSpan:
    """A pooling request whose prompt ends in this step, and the rows of its tokens in the batch."""

    request_id: str
    start: int  # first row of this step's tokens of the request in the flat batch
    end: int
    params: PoolingParams  # a span that needs_whole_prompt holds the whole prompt (the scheduler runs it whole)
    prompt_token_ids: list[int]  # the request's prompt: the tokens of a whole-prompt span's rows

    @classmethod
    def of(cls, request: RequestState, start: int, end: int) -> PoolingSpan:
        return cls(request.request_id, start, end, request.pooling_params, request.prompt_token_ids)


def token_type_ids(spans: list[PoolingSpan], num_tokens: int, device: torch.device) -> torch.Tensor | None:
    """[T] int64 segment ids of the batch (zeros outside the spans of cross-encoder pairs), or None when no span
    carries any."""
    pairs = [s for s in spans if s.params.token_type_ids]
    if not pairs:
        return None
    ids = np.zeros(num_tokens, dtype=np.int64)
    for s in pairs:
        ids[s.start : s.end] = s.params.token_type_ids
    return to_device(ids, torch.int64, device)

"""The runner's side of structured output: a step's grammar bitmask applied to the logits on the device.

The scheduler sends one bitmask row per sampling position of each constrained request (`StructuredStep`); the
runner's logits hold one row per sampling position of every sampling request, in its own batch order. Tokens a
row does not allow (bit i of int32 word w stands for token 32 * w + i) get -inf before anything else reads the
logits (penalties, sampling, logprobs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from loomserve.platform.input_batch import BatchInputs

FEATURE = "structured"


@dataclass
class StructuredStep:
    """A step's bitmask: `request_ids[i]` owns rows [starts[i], starts[i] + 1 + its drafts) of `bitmask`."""

    request_ids: list[str]
    starts: list[int]
    bitmask: torch.Tensor  # [R, ceil(V / 32)] int32, R = the constrained requests' sampling positions

    @classmethod
    def of(cls, data: StructuredStep | dict[str, Any]) -> StructuredStep:
        """The step data as sent, or as a runner in another process decodes it (a dict, the tensor in wire form)."""
        if isinstance(data, cls):
            return data
        from loomserve.platform.wire import tensor_from_wire

        return cls(data["request_ids"], data["starts"], tensor_from_wire(data["bitmask"]))


def apply_structured_bitmask(logits: torch.Tensor, data: StructuredStep | dict | None, batch: BatchInputs) -> None:
    """In place: mask the rows of `logits` [S, V] that belong to constrained requests."""
    if data is None:
        return
    data = StructuredStep.of(data)
    first_rows = np.cumsum([0] + [1 + len(d) for d in batch.drafts]).tolist()  # each sampling request's first row
    row_of = {r.request_id: first_rows[i] for i, r in enumerate(batch.sample_requests)}
    ends = [*data.starts[1:], data.bitmask.shape[0]]
    rows = []  # logits row of each bitmask row
    for request_id, start, end in zip(data.request_ids, data.starts, ends, strict=True):
        rows.extend(range(row_of[request_id], row_of[request_id] + end - start))
    # xgrammar's kernel (CUDA, or its C++ loop on CPU: 20x a torch unpack there) reads a bitmask row per logits
    # row; the unconstrained rows are all ones and skipped.
    import xgrammar as xgr

    # Pinned (torch's caching host allocator: reused, safe across in-flight copies): a copy from pageable memory
    # waits for the whole stream, the forward already launched for this step included, and so stops the host
    # from preparing the next step meanwhile.
    full = torch.full((logits.shape[0], data.bitmask.shape[1]), -1, dtype=torch.int32,
                      pin_memory=logits.is_cuda)  # [S, W]
    full[rows] = data.bitmask
    xgr.apply_token_bitmask_inplace(logits, full.to(logits.device, non_blocking=True), indices=rows)

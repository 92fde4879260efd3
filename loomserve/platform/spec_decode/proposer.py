"""What every proposer does: guess each request's next tokens from what it has so far. A proposer that keeps state
on the device (a draft model's or an EAGLE head's KV cache) also follows every step's tokens and the runner's KV
sizing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from loomserve.platform.forward_batch import ForwardBatch
    from loomserve.platform.input_batch import BatchInputs, RequestState


@dataclass
class LandedStep:
    """A step whose tokens reached the host, as a proposer drafts from it."""

    sampled: dict[str, list[int]]  # request id -> the tokens it kept this step
    followed: Any = None  # what the proposer's `follow` kept of the step on the device


class Proposer:
    def propose(self, states: list[RequestState], caps: list[int], landed: LandedStep) -> list[list[int]]:
        """Each request's drafts (at most caps[i]), from its tokens so far (all landed)."""
        raise NotImplementedError

    def prepare(self, batch: BatchInputs) -> None:
        """The step's batch is packed, before the target runs (a draft model runs over the same tokens; the drafts
        it verifies get their draft distributions)."""

    def for_graph(self, batch: ForwardBatch) -> None:
        """What the proposer adds to the ForwardBatch a CUDA graph of the target is captured with."""

    def follow(self, batch: BatchInputs, sampled: torch.Tensor) -> Any:
        """The step's rows are sampled (`sampled` [rows] on the device, in `batch.logits_indices` order): work that
        needs the target's forward and the new tokens, queued before the step lands; what it returns comes back in
        `LandedStep.followed`."""
        return None

    def release(self, request_ids: list[str]) -> None:
        """The runner forgot these requests."""

    def kv_bytes_per_block(self) -> int:
        return 0

    def init_kv_cache(self, num_blocks: int) -> None:
        """Allocate the proposer's own KV cache over the target's block ids."""

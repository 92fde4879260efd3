"""What every proposer does: guess each request's next tokens from what it has so far. A proposer that keeps state
on the device (a draft model's KV cache) also follows every step's tokens and the runner's KV sizing."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loomserve.platform.input_batch import BatchInputs, RequestState


class Proposer:
    def propose(self, states: list[RequestState], caps: list[int]) -> list[list[int]]:
        """Each request's drafts (at most caps[i]), from its tokens so far (all landed)."""
        raise NotImplementedError

    def prepare(self, batch: BatchInputs) -> None:
        """The step's batch is packed, before the target runs (a draft model runs over the same tokens; the drafts
        it verifies get their draft distributions)."""

    def release(self, request_ids: list[str]) -> None:
        """The runner forgot these requests."""

    def kv_bytes_per_block(self) -> int:
        return 0

    def init_kv_cache(self, num_blocks: int) -> None:
        """Allocate the proposer's own KV cache over the target's block ids."""

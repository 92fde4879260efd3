"""Prompt logprobs (vLLM's `SamplingParams.prompt_logprobs`): each prompt token's logprob given the tokens before it,
its rank, and the top-k, from the hidden states of the prompt positions a step runs.

Only the rows of requests that ask get an LM head (the others keep computing logits at their sampling positions
alone). A prompt prefilled in chunks is collected here across its steps, by position, and handed out once, with the
request's first sampled token. The scheduler gives such requests no prefix-cache hits (as vLLM does): a cached
block would skip the positions whose logprobs are asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from loomserve.platform.request import resolve_num_logprobs
from loomserve.platform.sampler import gather_logprobs
from loomserve.platform.step import TokenLogprobs

if TYPE_CHECKING:
    from loomserve.platform.input_batch import BatchInputs
    from loomserve.platform.step import NewRequest

_ROWS_PER_HEAD = 512  # positions per LM-head call: bounds the [rows, vocab] logits of a long prompt chunk


@dataclass
class PromptLogprobsCollector:
    """The runner's prompt logprobs of the requests that asked, until each is handed out. Entry i of a request's
    list is of prompt token i + 1 (predicted at position i); None until a step has run position i."""

    vocab_size: int
    collecting: dict[str, list[TokenLogprobs | None]] = field(default_factory=dict)

    def admit(self, new_requests: list[NewRequest]) -> None:
        for new in new_requests:
            if new.sampling_params is not None and new.sampling_params.prompt_logprobs is not None:
                self.collecting[new.request_id] = [None] * (len(new.prompt_token_ids) - 1)

    def add(self, model: torch.nn.Module, hidden: torch.Tensor, batch: BatchInputs) -> None:
        """hidden: [T, hidden] of the step's flat batch. Computes the logprobs of the prompt tokens that follow the
        positions this step runs, for the requests still collecting theirs (nothing to do for any other step)."""
        if not self.collecting:
            return
        starts = batch.forward.attn.query_start_loc_cpu
        for i, (s, state) in enumerate(zip(batch.scheduled, batch.requests, strict=True)):
            entries = self.collecting.get(s.request_id)
            end = min(s.start + s.num_new_tokens, len(entries or ()))  # the prompt's last position predicts output
            if entries is None or end <= s.start:
                continue
            rows = hidden[starts[i] : starts[i] + end - s.start]  # [n, hidden]
            targets = state.prompt_token_ids[s.start + 1 : end + 1]
            k = resolve_num_logprobs(state.sampling_params.prompt_logprobs, self.vocab_size)
            entries[s.start : end] = _logprobs(model, rows, targets, k)

    def take(self, request_ids: list[str]) -> dict[str, list[TokenLogprobs]]:
        """The complete prompt logprobs of the requests that sampled this step (their first token), handed out once:
        a preempted request that runs its prompt again is not collecting any more."""
        out = {}
        for request_id in request_ids:
            entries = self.collecting.get(request_id)
            if entries is not None and all(e is not None for e in entries):
                out[request_id] = self.collecting.pop(request_id)
        return out

    def release(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.collecting.pop(request_id, None)


def _logprobs(model: torch.nn.Module, hidden: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprobs]:
    """Per row: (target then top-k token ids, their logprobs, the target's rank) of the raw logits, as the sampler
    gives them for sampled tokens."""
    target_ids = torch.tensor(targets, device=hidden.device)  # [n]
    out: list[TokenLogprobs] = []
    for begin in range(0, hidden.shape[0], _ROWS_PER_HEAD):
        logprobs = model.compute_logits(hidden[begin : begin + _ROWS_PER_HEAD]).float().log_softmax(dim=-1)  # [r, V]
        rows = gather_logprobs(logprobs, target_ids[begin : begin + _ROWS_PER_HEAD], k)
        out += zip(rows.logprob_token_ids.tolist(), rows.logprobs.tolist(), rows.sampled_token_ranks.tolist(),
                   strict=True)
    return out

"""The step as a value: what the scheduler hands the runner(s), and what comes back.

Nothing in a `ScheduledStep` is live: a request the runner has not seen arrives in full once (`NewRequest`),
after that each step carries only its diff (tokens to run, blocks allocated since, `resumed` after a
preemption), so a runner in another process keeps its own per-request state (`input_batch.py`). Features
put their per-step data in `features[name]` and read their results from `StepResult.features[name]`.
Both values encode with `platform/wire.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from loomserve.adapters.request import LoRARequest
from loomserve.modalities.inputs import MultiModalItem
from loomserve.platform.request import SamplingParams
from loomserve.pooling.params import PoolingParams

# Logprobs of one generated token: (token ids, logprobs, rank of the sampled token); sampled token first.
TokenLogprobs = tuple[list[int], list[float], int]


@dataclass
class NewRequest:
    """A request on its first scheduled step: everything the runner keeps about it."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams | None  # None for a pooling request
    eos_token_id: int | None = None
    pooling_params: PoolingParams | None = None
    lora_request: LoRARequest | None = None
    mm_items: list[MultiModalItem] = field(default_factory=list)


@dataclass
class ScheduledRequest:
    """One request's share of a step: it runs positions [start, start + num_new_tokens)."""

    request_id: str
    num_new_tokens: int
    start: int  # tokens computed before this step
    new_block_ids: list[int]  # blocks allocated since the runner last heard of the request (all, when new or resumed)
    resumed: bool = False  # back after a preemption: `new_block_ids` is its whole block table
    samples: bool = False  # the step reaches the end of the sequence: its last logits pick the next token
    pools: bool = False  # the step ends a pooling request's prompt: its hidden states become its output
    spec_token_ids: list[int] = field(default_factory=list)  # drafts run after its last token, verified by sampling


@dataclass
class ScheduledStep:
    new_requests: list[NewRequest] = field(default_factory=list)
    scheduled: list[ScheduledRequest] = field(default_factory=list)  # in the scheduler's order
    finished_ids: list[str] = field(default_factory=list)  # ended since the last step: the runner forgets them
    preempted_ids: list[str] = field(default_factory=list)  # lost their blocks: the runner drops their tables
    features: dict[str, Any] = field(default_factory=dict)  # feature name -> its scheduler hook's step data

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        """Nothing for the runner: no tokens, no news of requests, no feature data."""
        return not (self.scheduled or self.finished_ids or self.preempted_ids or self.features)


@dataclass
class StepResult:
    sampled: dict[str, list[int]] = field(default_factory=dict)  # request id -> new tokens, in order
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)  # request id -> one entry per new token
    pooled: dict[str, torch.Tensor] = field(default_factory=dict)  # request id -> pooled output (float32, host)
    features: dict[str, Any] = field(default_factory=dict)  # feature name -> its runner hook's result
    # request id -> the logprobs of prompt tokens 1.. (vLLM's prompt_logprobs), once, with its first sampled token
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)

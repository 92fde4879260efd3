"""The speculative-decoding feature's hooks.

Scheduler side: drafts proposed for a request wait on it (`Request.spec_token_ids`) until the scheduler books them
with its next decode; a step with at least `disable_by_batch_size` running requests does not speculate (its drafts
are dropped and the runner is told not to propose), and while speculation is on the next step waits for the one in
flight to land (how far a request got decides what it runs next).

Runner side: once a step's tokens reach the host, the proposer drafts up to k tokens for each request that sampled
(no further than its max_tokens or the context); a draft model also runs over every step's tokens to keep its own
KV cache in step with the target's, and hands the rejection sampler its draft distributions; an EAGLE-3 head reads
the target's hidden states of every step and runs over its positions once the step has sampled.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from loomserve.platform.features import RunnerHook, SchedulerHook
from loomserve.platform.spec_decode.ngram import NgramProposer, RepeatProposer
from loomserve.platform.spec_decode.proposer import LandedStep, Proposer

if TYPE_CHECKING:
    from loomserve.platform.config import EngineConfig, SpeculativeConfig
    from loomserve.platform.forward_batch import ForwardBatch
    from loomserve.platform.input_batch import BatchInputs, RequestState
    from loomserve.platform.request import Request
    from loomserve.platform.step import ScheduledStep


def scheduler_hook(config: EngineConfig) -> SpecDecodeScheduling | None:
    spec = config.speculative_config
    return None if spec is None else SpecDecodeScheduling(spec)


def runner_hook(config: EngineConfig, model: nn.Module, device: torch.device) -> SpecDecodeRunnerHook | None:
    spec = config.speculative_config
    if spec is None:
        return None
    return SpecDecodeRunnerHook(_proposer(spec, config, model, device), spec.num_speculative_tokens,
                                config.model_config.max_model_len)


def _proposer(spec: SpeculativeConfig, config: EngineConfig, model: nn.Module, device: torch.device) -> Proposer:
    if spec.method == "draft_model":
        from loomserve.platform.spec_decode.draft_model import DraftModelProposer

        return DraftModelProposer(spec, config, device)
    if spec.method == "eagle3":
        from loomserve.platform.spec_decode.eagle3 import Eagle3Proposer

        return Eagle3Proposer(spec, config, model, device)
    if spec.synthetic_acceptance_rate is not None:
        return RepeatProposer()
    return NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)


class SpecDecodeScheduling(SchedulerHook):
    name = "spec"

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.active = True  # whether the step being scheduled speculates

    def begin_step(self, running: list[Request]) -> None:
        self.active = self.config.speculates(len(running))
        if not self.active:
            for request in running:
                request.spec_token_ids = []

    def release(self, request: Request) -> None:
        request.spec_token_ids = []

    def step_data(self, running: list[Request]) -> Any:
        return None if self.active else {"propose": False}

    def update(self, result: Any, requests: dict[str, Request]) -> dict[str, str]:
        for request_id, drafts in result.items():
            request = requests.get(request_id)
            if request is not None and not request.status.finished:
                request.spec_token_ids = drafts
        return {}

    def holds_run_ahead(self) -> bool:
        return self.active


@dataclass
class LaunchedStep:
    proposes: bool  # whether drafts are wanted once it lands
    states: list[RequestState] = field(default_factory=list)  # the requests that sample
    followed: Any = None  # what the proposer's `follow` kept of it


class SpecDecodeRunnerHook(RunnerHook):
    name = "spec"

    def __init__(self, proposer: Proposer, num_speculative_tokens: int, max_model_len: int) -> None:
        self.proposer = proposer
        self.k = num_speculative_tokens
        self.max_model_len = max_model_len
        self.launched: deque[LaunchedStep] = deque()  # oldest first

    def begin_step(self, step: ScheduledStep) -> None:
        self.launched.append(LaunchedStep(step.features.get(self.name, {}).get("propose", True)))

    def prepare(self, step: ScheduledStep, batch: BatchInputs) -> None:
        self.launched[-1].states = batch.sample_requests
        self.proposer.prepare(batch)

    def for_graph(self, batch: ForwardBatch) -> None:
        self.proposer.for_graph(batch)

    def for_profile(self, batch: ForwardBatch) -> None:
        self.proposer.for_graph(batch)

    def after_sample(self, batch: BatchInputs, sampled: torch.Tensor) -> None:
        self.launched[-1].followed = self.proposer.follow(batch, sampled)

    def land(self, sampled: dict[str, list[int]]) -> dict[str, list[int]] | None:
        step = self.launched.popleft()
        if not step.proposes or not step.states:
            return None
        caps = [self._cap(s) for s in step.states]
        drafts = self.proposer.propose(step.states, caps, LandedStep(sampled, step.followed))
        return {s.request_id: d for s, d in zip(step.states, drafts) if d}

    def _cap(self, state: RequestState) -> int:
        """At most k drafts, none past the request's max_tokens (the token after the drafts comes anyway) or the
        context."""
        max_tokens = state.sampling_params.max_tokens or self.max_model_len
        return max(0, min(self.k, max_tokens - state.num_output_tokens - 1, self.max_model_len - state.num_tokens))

    def release(self, request_ids: list[str]) -> None:
        self.proposer.release(request_ids)

    def kv_bytes_per_block(self) -> int:
        return self.proposer.kv_bytes_per_block()

    def init_kv_cache(self, num_blocks: int) -> None:
        self.proposer.init_kv_cache(num_blocks)

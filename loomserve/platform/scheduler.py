"""Continuous batching over a token budget: running requests first, then waiting ones.

Decodes take one token, prefills take chunks of whatever budget is left (chunked prefill), so
prefill and decode share one flat batch. When blocks run out, the lowest-priority running request
(the latest admitted) is preempted by recompute: its blocks are freed and it waits to run again
from its prompt plus what it has generated, which the prefix cache often still holds.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loomserve.modalities.encoder_cache import EncoderCacheManager
from loomserve.modalities.inputs import MultiModalItem
from loomserve.platform.config import CacheConfig, SchedulerConfig
from loomserve.platform.kv_cache import KVCacheManager
from loomserve.platform.request import Request, RequestStatus
from loomserve.platform.stats import SchedulerStats

if TYPE_CHECKING:
    from loomserve.adapters.request import LoRARequest
    from loomserve.adapters.scheduling import LoRAAdmission


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    block_ids: list[int]  # the request's whole block table (the KV manager's list, not a copy)
    start: int  # tokens computed before this step: the step runs positions [start, start + num_new_tokens)
    samples: bool  # the step reaches the end of the sequence, so its last logits pick the next token
    pools: bool  # the step ends a pooling request's prompt, so its hidden states become its output (nothing samples)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    encoder_inputs: list[MultiModalItem] = field(default_factory=list)  # media whose encoder runs this step
    freed_encoder_hashes: list[str] = field(default_factory=list)  # encoder outputs to drop before that
    active_loras: dict[int, LoRARequest] = field(default_factory=dict)  # adapters of all running requests

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        max_model_len: int,
        *,
        lora_admission: LoRAAdmission | None = None,  # None: LoRA off
        encoder_cache: EncoderCacheManager | None = None,  # multimodal models only
    ) -> None:
        self.config = scheduler_config
        self.max_model_len = max_model_len
        self.kv = KVCacheManager(cache_config.num_blocks, cache_config.block_size, cache_config.enable_prefix_caching)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0  # since the last stats()
        self.total_preemptions = 0
        self.num_needing_history = 0  # requests whose sampling reads their generated tokens
        self.lora_admission = lora_admission
        self.encoder_cache = encoder_cache

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self.num_needing_history += request.needs_history

    def can_run_ahead(self) -> bool:
        """Whether the next step may be scheduled before this one's tokens are known: only when no request's
        sampling depends on the tokens themselves."""
        return self.num_needing_history == 0

    def has_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        if self.encoder_cache is not None:
            self.encoder_cache.start_step()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted_ids:
            self._schedule_waiting(out, budget)
        if self.encoder_cache is not None:
            out.encoder_inputs, out.freed_encoder_hashes = self.encoder_cache.finish_step()
        if self.lora_admission is not None:
            out.active_loras = self.lora_admission.active(self.running)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if self._awaits_landing(request):
                i += 1
                continue
            n = min(request.num_tokens + request.num_pending_tokens - request.num_computed_tokens, budget)
            n = self._fit_encoder(request, request.num_computed_tokens, n)
            if n == 0:  # its next media item cannot be encoded this step
                i += 1
                continue
            while not self.kv.allocate_slots(request, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted_ids.append(victim.request_id)
                if victim is request:
                    return budget
            self._commit_encoder(request, request.num_computed_tokens, n)
            out.scheduled.append(self._schedule(request, n))
            budget -= n
            i += 1
        return budget

    def _awaits_landing(self, request: Request) -> bool:
        """Nothing more to run until a step in flight lands: a pooling request's whole prompt has run, or a token in
        flight already reaches max_tokens or the context."""
        if request.pooling_params is not None:
            return request.num_computed_tokens == request.num_tokens
        if not request.num_pending_tokens:
            return False
        max_tokens = request.sampling_params.max_tokens or self.max_model_len
        num_output = request.num_output_tokens + request.num_pending_tokens
        return num_output >= max_tokens or request.num_tokens + request.num_pending_tokens >= self.max_model_len

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        skipped: list[Request] = []  # waiting on an adapter: passed over this step, keeping their places
        if self.lora_admission is not None:
            self.lora_admission.begin(self.running)
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if request.num_pending_tokens:  # preempted with a token in flight: resume once it has landed
                break
            if self.lora_admission is not None and not self.lora_admission.admits(request):
                skipped.append(self.waiting.popleft())
                continue
            computed_blocks, num_hit = self.kv.get_computed_blocks(request)
            remaining = request.num_tokens - num_hit
            n = self._fit_encoder(request, num_hit, min(remaining, budget))
            if n < remaining and not self._may_chunk(request):
                break  # runs whole in a later step (the front end refuses prompts over the whole budget)
            if n == 0 or not self.kv.allocate_slots(request, n, computed_blocks):
                break
            self._commit_encoder(request, num_hit, n)
            self.waiting.popleft()
            request.num_computed_tokens = num_hit
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(self._schedule(request, n))
            budget -= n
        self.waiting.extendleft(reversed(skipped))

    def _may_chunk(self, request: Request) -> bool:
        """Bidirectional models and pooling over every token need the whole prompt in one step."""
        return self.config.enable_chunked_prefill and not request.needs_whole_prompt

    def _schedule(self, request: Request, n: int) -> ScheduledRequest:
        """Commit `n` tokens of the request to this step; a step that reaches the end puts a token in flight, or a
        pooling request's output."""
        start = request.num_computed_tokens
        reaches_end = start + n == request.num_tokens + request.num_pending_tokens
        pools = reaches_end and request.pooling_params is not None
        samples = reaches_end and not pools
        request.num_computed_tokens = start + n
        request.num_pending_tokens += samples
        return ScheduledRequest(request, n, self.kv.block_ids(request.request_id), start, samples, pools)

    def _fit_encoder(self, request: Request, start: int, n: int) -> int:
        """`n` cut before the first media item whose encoder output can be neither found nor made this step."""
        if self.encoder_cache is None or not request.mm_items:
            return n
        return self.encoder_cache.fit(request, start, n)

    def _commit_encoder(self, request: Request, start: int, n: int) -> None:
        if self.encoder_cache is not None and request.mm_items:
            self.encoder_cache.commit(request, start, n)

    def _release_encoder(self, request: Request) -> None:
        if self.encoder_cache is not None:
            self.encoder_cache.release(request)

    def _preempt(self, request: Request) -> None:
        self._release_encoder(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(request)
        self.num_preemptions += 1
        self.total_preemptions += 1

    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Land the step's sampled tokens, finish what stopped and the pooling requests (done once their prompt is);
        returns the requests that got a token or their pooled output."""
        updated = []
        for s in out.scheduled:
            if not (s.samples or s.pools):
                continue
            request = s.request
            request.num_pending_tokens -= s.samples
            if request.status.finished:  # stopped or aborted while this step was in flight
                continue
            if s.pools:
                request.status = RequestStatus.FINISHED_STOPPED
            else:
                token = sampled[request.request_id]
                request.output_token_ids.append(token)
                self._check_stop(request, token)
            if request.status.finished:
                self._finish(request)
            updated.append(request)
        return updated

    def _check_stop(self, request: Request, token: int) -> None:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if token == request.eos_token_id and not params.ignore_eos:
                request.status = RequestStatus.FINISHED_STOPPED
                return
            if token in params.stop_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = token
                return
        max_tokens = params.max_tokens or self.max_model_len
        if request.num_output_tokens >= max_tokens or request.num_tokens >= self.max_model_len:
            request.status = RequestStatus.FINISHED_LENGTH

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> list[Request]:
        """End requests from outside the step (aborts, stop strings): their blocks are freed at once."""
        finished = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.status.finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            self._finish(request)
            finished.append(request)
        return finished

    def _finish(self, request: Request) -> None:
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:  # preempted while its last token was in flight
            self.waiting.remove(request)
        self._release_encoder(request)
        self.kv.free(request)
        del self.requests[request.request_id]
        self.num_needing_history -= request.needs_history

    def stats(self) -> SchedulerStats:
        queries, hits = self.kv.take_stats()
        preemptions, self.num_preemptions = self.num_preemptions, 0
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv.usage,
            prefix_cache_queries=queries,
            prefix_cache_hits=hits,
            num_preemptions=preemptions,
        )

"""Continuous batching over a token budget: running requests first, then waiting ones.

Decodes take one token (plus the drafts a speculative proposer made for it, verified in the same
forward; what the target rejects is rolled back when the step lands), prefills take chunks of
whatever budget is left (chunked prefill), so prefill and decode share one flat batch. When
blocks run out, the lowest-priority running request (the latest admitted) is preempted by
recompute: its blocks are freed and it waits to run again from its prompt plus what it has
generated, which the prefix cache often still holds. A model that keeps no KV (an encoder) takes no blocks: its
prompts run whole and end with their step.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterable

from loomserve.platform.config import CacheConfig, SchedulerConfig
from loomserve.platform.features import SchedulerHook, feature_off, find_hook
from loomserve.platform.kv_cache import KVCacheManager
from loomserve.platform.request import Request, RequestStatus
from loomserve.platform.stats import SchedulerStats, SpecDecodingStats
from loomserve.platform.step import NewRequest, ScheduledRequest, ScheduledStep, StepResult


class Scheduler:
    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        max_model_len: int,
        num_blocks: int,
        hooks: list[SchedulerHook] | None = None,  # the features' admission, budgets and step data
        uses_kv_cache: bool = True,  # False: the model keeps no KV (an encoder), requests take no blocks
    ) -> None:
        self.config = scheduler_config
        self.max_model_len = max_model_len
        self.kv = KVCacheManager(num_blocks, cache_config.block_size, cache_config.enable_prefix_caching)
        self.uses_kv_cache = uses_kv_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0  # since the last stats()
        self.first_scheduled: dict[str, float] = {}  # request id -> when it was first scheduled, since the last stats()
        self.total_preemptions = 0
        self.num_needing_history = 0  # requests whose sampling reads their generated tokens
        self.num_awaiting_pooled = 0  # running pooling requests whose whole prompt has run (`_awaits_pooled_output`)
        self.hooks = hooks or []
        for hook in self.hooks:
            hook.attach_kv(self.kv)
        self.finished_ids: list[str] = []  # ended since the last step: the runner forgets them with the next one
        self.spec_stats: SpecDecodingStats | None = None  # drafts verified since the last stats()
        self.num_iteration_tokens = 0  # tokens the steps landed since the last stats() count (`_landed_tokens`)

    def hook(self, name: str) -> SchedulerHook | None:
        return find_hook(self.hooks, name)

    def add_request(self, request: Request) -> None:
        """Queue a request; ValueError when it needs a feature this engine runs without."""
        for name in request.needed_features:
            if self.hook(name) is None:
                raise feature_off(name)
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self.num_needing_history += request.needs_history
        for hook in self.hooks:
            hook.add_request(request)

    def can_run_ahead(self) -> bool:
        """Whether the next step may be scheduled before this one's tokens are known: only when no request's
        sampling depends on the tokens themselves, and no feature's next step depends on this one's result (drafts)."""
        return self.num_needing_history == 0 and not any(hook.holds_run_ahead() for hook in self.hooks)

    def has_requests(self) -> bool:
        """Whether there is work for a step: requests, or a feature's own (a KV connector serving blocks)."""
        return bool(self.waiting or self.running) or any(hook.busy() for hook in self.hooks)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep(finished_ids=self.finished_ids)
        self.finished_ids = []
        for hook in self.hooks:
            hook.begin_step(self.running)
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(step, budget)
        if not step.preempted_ids:
            self._schedule_waiting(step, budget)
        for hook in self.hooks:
            data = hook.step_data(self.running)
            if data is not None:
                step.features[hook.name] = data
        return step

    def _schedule_running(self, step: ScheduledStep, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if self._awaits_landing(request):
                i += 1
                continue
            remaining = request.num_tokens + request.num_pending_tokens - request.num_computed_tokens
            num_drafts = len(request.spec_token_ids) if remaining == 1 else 0  # drafts follow a decode's token
            n = min(remaining + num_drafts, budget)
            n = self._fit(request, request.num_computed_tokens, n)
            if n == 0:  # a feature holds its next tokens back this step (e.g. a media item that cannot be encoded)
                i += 1
                continue
            while not self._allocate(request, self._with_lookahead(request, n)):
                victim = self.running.pop()
                self._preempt(victim)
                step.preempted_ids.append(victim.request_id)
                if victim is request:
                    return budget
            self._schedule(step, request, n, max(0, n - remaining))
            budget -= n
            i += 1
        return budget

    def _awaits_landing(self, request: Request) -> bool:
        """Nothing more to run until a step in flight lands: a pooling request's whole prompt has run, or a token in
        flight already reaches max_tokens or the context."""
        if request.pooling_params is not None:
            return _awaits_pooled_output(request)
        if not request.num_pending_tokens:
            return False
        max_tokens = request.sampling_params.max_tokens or self.max_model_len
        num_output = request.num_output_tokens + request.num_pending_tokens
        return num_output >= max_tokens or request.num_tokens + request.num_pending_tokens >= self.max_model_len

    def _schedule_waiting(self, step: ScheduledStep, budget: int) -> None:
        skipped: list[Request] = []  # held back by a feature (e.g. an adapter loading): keep their places
        # Pooling requests whose whole prompt has run wait only for their step to land: they hold no seat of
        # max_num_seqs (else, with async scheduling, no request could join the step after theirs).
        seated = len(self.running) - self.num_awaiting_pooled
        while self.waiting and budget > 0 and seated < self.config.max_num_seqs:
            request = self.waiting[0]
            if request.num_pending_tokens:  # preempted with a token in flight: resume once it has landed
                break
            if not all(hook.admits(request) for hook in self.hooks):
                skipped.append(self.waiting.popleft())
                continue
            computed_blocks, num_hit = self.kv.get_computed_blocks(request) if self.uses_kv_cache else ([], 0)
            remaining = request.num_tokens - num_hit
            n = self._fit(request, num_hit, min(remaining, budget))
            if n < remaining and not self._may_chunk(request):
                break  # runs whole in a later step (the front end refuses prompts over the whole budget)
            if n == 0 or not self._allocate(request, self._with_lookahead(request, n, num_hit), computed_blocks):
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_hit
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            seated += 1
            self._schedule(step, request, n)
            budget -= n
        self.waiting.extendleft(reversed(skipped))

    def _allocate(self, request: Request, n: int, computed_blocks: list | None = None) -> bool:
        """Reserve KV slots for `n` more tokens after the prefix hit (always room when the model keeps no KV)."""
        return not self.uses_kv_cache or self.kv.allocate_slots(request, n, computed_blocks)

    def _may_chunk(self, request: Request) -> bool:
        """Bidirectional models and pooling over every token need the whole prompt in one step."""
        return self.config.enable_chunked_prefill and not request.needs_whole_prompt

    def _with_lookahead(self, request: Request, n: int, num_hit: int = 0) -> int:
        """`n` tokens and the KV slots a draft model writes ahead of them, within the context."""
        start = request.num_computed_tokens + num_hit
        return min(n + self.config.num_lookahead_tokens, max(n, self.max_model_len - start))

    def _fit(self, request: Request, start: int, n: int) -> int:
        for hook in self.hooks:
            n = hook.fit(request, start, n)
        return n

    def _schedule(self, step: ScheduledStep, request: Request, n: int, num_drafts: int = 0) -> None:
        """Commit `n` tokens of the request to the step, the last `num_drafts` of them its first drafts; a step that
        reaches the end puts a token in flight (1 + the accepted drafts, once verified), or a pooling request's
        output. The runner hears of the request in full once, then of its new blocks."""
        for hook in self.hooks:
            hook.commit(request, request.num_computed_tokens, n)
        start = request.num_computed_tokens
        drafts, request.spec_token_ids = request.spec_token_ids[:num_drafts], []
        reaches_end = start + n - num_drafts == request.num_tokens + request.num_pending_tokens
        pools = reaches_end and request.pooling_params is not None
        samples = reaches_end and not pools
        request.num_computed_tokens = start + n
        request.num_pending_tokens += samples
        self.num_awaiting_pooled += pools
        resumed = request.known_to_runner and request.num_blocks_sent == 0
        if not request.known_to_runner:
            self.first_scheduled[request.request_id] = time.time()
            step.new_requests.append(NewRequest(
                request.request_id, request.prompt_token_ids, request.sampling_params, request.eos_token_id,
                request.pooling_params, request.lora_request, request.mm_items,
            ))
            request.known_to_runner = True
        new_block_ids = []
        if self.uses_kv_cache:
            block_ids = self.kv.block_ids(request.request_id)
            new_block_ids = block_ids[request.num_blocks_sent:]
            request.num_blocks_sent = len(block_ids)
        step.scheduled.append(ScheduledRequest(request.request_id, n, start, new_block_ids, resumed, samples, pools,
                                               drafts))

    def _release(self, request: Request) -> None:
        for hook in self.hooks:
            hook.release(request)

    def _preempt(self, request: Request) -> None:
        self._release(request)
        self._free(request)
        request.num_computed_tokens = 0
        request.num_blocks_sent = 0
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(request)
        self.num_preemptions += 1
        self.total_preemptions += 1

    def update_from_output(self, step: ScheduledStep, result: StepResult) -> list[tuple[Request, int]]:
        """Land a step's sampled tokens (any number per request), finish what stopped and the pooling requests (done
        once their prompt is); returns each request that got tokens or its pooled output, with how many of the
        step's tokens it took (tokens after a stop are dropped)."""
        updated, ended = [], []
        for s in step.scheduled:
            if not (s.samples or s.pools):
                continue
            request = self.requests.get(s.request_id)
            if request is None:  # finished (stopped or aborted) while this step was in flight
                continue
            request.num_pending_tokens -= s.samples
            taken = 0
            if s.pools:
                request.status = RequestStatus.FINISHED_STOPPED
            else:
                tokens = result.sampled[s.request_id]
                if s.spec_token_ids:
                    self._roll_back(request, s.spec_token_ids, tokens)
                for token in tokens:
                    request.output_token_ids.append(token)
                    taken += 1
                    self._check_stop(request, token)
                    if request.status.finished:
                        break
            if request.status.finished:
                ended.append(request)
            self.num_iteration_tokens += _landed_tokens(request, taken, s.pools)
            updated.append((request, taken))
        self._finish_all(ended)
        return updated

    def _roll_back(self, request: Request, drafts: list[int], tokens: list[int]) -> None:
        """The target kept the first len(tokens) - 1 drafts: the KV of the rest is recomputed over (the prefix cache
        never held it: only landed tokens fill cached blocks)."""
        num_accepted = len(tokens) - 1
        request.num_computed_tokens -= len(drafts) - num_accepted
        if self.spec_stats is None:
            self.spec_stats = SpecDecodingStats()
        self.spec_stats.observe(len(drafts), num_accepted)

    def update_features(self, result: StepResult) -> list[Request]:
        """Hand each feature its runner hooks' result; ends (aborted) the requests a feature cannot serve."""
        finished = []
        for hook in self.hooks:
            if hook.name in result.features:
                refused = hook.update(result.features[hook.name], self.requests)
                finished += self.finish_requests(list(refused), RequestStatus.FINISHED_ABORTED)
            finished += self.finish_requests(list(hook.take_refused()), RequestStatus.FINISHED_ABORTED)
        return finished

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

    def _finish_all(self, requests: list[Request]) -> None:
        """Finish the requests a step ended: running ones leave `running` in one pass (a step may end a thousand
        pooling requests; removing each on its own walked the list once per request)."""
        if not requests:
            return
        ended = set(requests)
        running = [r for r in self.running if r not in ended]
        if len(self.running) - len(running) < len(requests):  # preempted while their last token was in flight
            for request in ended.difference(self.running):
                self.waiting.remove(request)
        self.running[:] = running
        for request in requests:
            self._finish(request)

    def _finish(self, request: Request) -> None:
        """The bookkeeping of a request that has left `running` and `waiting`."""
        self._release(request)
        self._free(request)
        del self.requests[request.request_id]
        if request.known_to_runner:
            self.finished_ids.append(request.request_id)
        self.num_needing_history -= request.needs_history

    def _free(self, request: Request) -> None:
        """Give back the request's blocks; a pooling request whose prompt had run stops waiting for its output."""
        self.num_awaiting_pooled -= _awaits_pooled_output(request)
        if self.uses_kv_cache:
            self.kv.free(request)

    def stats(self) -> SchedulerStats:
        queries, hits = self.kv.take_stats()
        preemptions, self.num_preemptions = self.num_preemptions, 0
        spec, self.spec_stats = self.spec_stats, None
        first_scheduled, self.first_scheduled = self.first_scheduled, {}
        iteration_tokens, self.num_iteration_tokens = self.num_iteration_tokens, 0
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv.usage,
            prefix_cache_queries=queries,
            prefix_cache_hits=hits,
            num_preemptions=preemptions,
            num_iteration_tokens=iteration_tokens,
            spec_decoding=spec,
            first_scheduled=first_scheduled,
            running_lora_adapters=_adapter_counts(self.running),
            waiting_lora_adapters=_adapter_counts(self.waiting),
        )


def _landed_tokens(request: Request, taken: int, pooled: bool) -> int:
    """What a landed step counts for a request in vLLM's iteration_tokens_total: the tokens it took, plus its prompt
    once that is done (its first token, or its pooled output)."""
    prompt_done = pooled or 0 < taken == request.num_output_tokens
    return taken + (request.num_prompt_tokens if prompt_done else 0)


def _awaits_pooled_output(request: Request) -> bool:
    """A pooling request whose whole prompt has run: all that is left is its step landing."""
    return request.pooling_params is not None and request.num_computed_tokens == request.num_tokens


def _adapter_counts(requests: Iterable[Request]) -> dict[str, int]:
    """Adapter name -> requests using it (vLLM's lora_requests_info labels)."""
    return dict(Counter(r.lora_request.lora_name for r in requests if r.lora_request is not None))

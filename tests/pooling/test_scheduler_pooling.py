"""Pooling requests in the scheduler: prefill only over the shared token budget, finished (and their blocks freed)
as soon as the step that ran their prompt lands; encoder prompts and every-token pooling run whole and skip the
prefix cache."""

from __future__ import annotations

from loomserve import PoolingParams, SamplingParams
from loomserve.platform.config import CacheConfig, SchedulerConfig
from loomserve.platform.request import Request, RequestStatus
from loomserve.platform.scheduler import Scheduler
from loomserve.platform.step import StepResult


def make_scheduler(budget: int = 10, chunked: bool = True, num_blocks: int = 64) -> Scheduler:
    cache = CacheConfig(block_size=4, enable_prefix_caching=True)
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8, enable_chunked_prefill=chunked)
    return Scheduler(config, cache, 256, num_blocks)


def pooling(s: Scheduler, request_id: str, n: int, pooling_type: str = "LAST") -> Request:
    request = Request(request_id, list(range(100, 100 + n)), None,
                      pooling_params=PoolingParams(pooling_type=pooling_type, normalize=True))
    s.add_request(request)
    return request


def generation(s: Scheduler, request_id: str, n: int) -> Request:
    request = Request(request_id, list(range(100, 100 + n)), SamplingParams(max_tokens=4, ignore_eos=True))
    s.add_request(request)
    return request


def run_step(s: Scheduler) -> list[tuple[str, int]]:
    out = s.schedule()
    sampled = {x.request_id: [7] for x in out.scheduled if x.samples}
    s.update_from_output(out, StepResult(sampled))
    return [(x.request_id, x.num_new_tokens) for x in out.scheduled]


def test_pooling_request_finishes_after_its_prefill_and_frees_its_blocks():
    s = make_scheduler()
    request = pooling(s, "p", 6)
    out = s.schedule()
    assert [(x.pools, x.samples) for x in out.scheduled] == [(True, False)]
    s.update_from_output(out, StepResult())
    assert request.status == RequestStatus.FINISHED_STOPPED and request.output_token_ids == []
    assert s.kv.pool.num_free_blocks == 64 and not s.has_requests()


def test_last_token_pooling_is_chunked_on_a_causal_model():
    s = make_scheduler(budget=10)
    pooling(s, "p", 25)
    assert [run_step(s) for _ in range(3)] == [[("p", 10)], [("p", 10)], [("p", 5)]]
    assert not s.has_requests()


def test_encoder_prompts_run_whole_and_wait_for_room_in_the_budget():
    s = make_scheduler(budget=10, chunked=False)
    pooling(s, "a", 6, "MEAN")
    pooling(s, "b", 6, "MEAN")
    pooling(s, "c", 3, "MEAN")
    assert run_step(s) == [("a", 6)]  # b does not fit whole in the 4 tokens left; c waits behind it
    assert run_step(s) == [("b", 6), ("c", 3)]
    assert not s.has_requests()


def test_every_token_pooling_runs_whole_beside_decodes():
    s = make_scheduler(budget=10)
    generation(s, "g", 4)
    run_step(s)
    pooling(s, "p", 9, "MEAN")
    assert run_step(s) == [("g", 1), ("p", 9)]


def test_every_token_pooling_skips_the_prefix_cache_and_last_token_pooling_uses_it():
    s = make_scheduler(budget=64)
    pooling(s, "warm", 17)
    run_step(s)
    mean = pooling(s, "mean", 17, "MEAN")
    last = pooling(s, "last", 17, "LAST")
    assert run_step(s) == [("mean", 17), ("last", 1)]  # LAST reuses the 16 cached tokens' KV
    assert (mean.num_cached_tokens, last.num_cached_tokens) == (0, 16)


def test_pooling_request_in_flight_is_not_scheduled_again_and_lands_once():
    s = make_scheduler()
    p = pooling(s, "p", 6)
    first = s.schedule()
    second = s.schedule()  # async scheduling: the next step is scheduled before the first lands
    assert [x.pools for x in first.scheduled] == [True] and second.scheduled == []
    assert s.update_from_output(first, StepResult()) == [(p, 0)] and p.status == RequestStatus.FINISHED_STOPPED
    assert s.update_from_output(second, StepResult()) == []
    assert s.kv.pool.num_free_blocks == 64 and not s.has_requests()


def test_pooling_request_preempted_while_in_flight_finishes_with_its_step_and_never_reruns():
    s = make_scheduler(budget=16, num_blocks=4)
    g = generation(s, "g", 7)
    run_step(s)  # g holds 2 blocks and 8 tokens
    p = pooling(s, "p", 8, "MEAN")  # no prefix-cache hit on g's blocks
    first = s.schedule()  # g's decode and p's whole prompt: every block taken
    assert [(x.request_id, x.pools) for x in first.scheduled] == [("g", False), ("p", True)]
    second = s.schedule()  # g's next token needs a block: the latest admitted, p, is preempted in flight
    assert second.preempted_ids == ["p"] and [x.request_id for x in second.scheduled] == ["g"]
    # p's output was computed: it finishes all the same
    assert s.update_from_output(first, StepResult({"g": [7]})) == [(g, 1), (p, 0)]
    assert p.status == RequestStatus.FINISHED_STOPPED and p not in s.waiting
    s.update_from_output(second, StepResult({"g": [7]}))
    while s.has_requests():
        assert [request_id for request_id, _ in run_step(s)] == ["g"]
    assert s.kv.pool.num_free_blocks == 4


def test_pooling_requests_awaiting_their_landing_leave_their_seats_to_the_next_step():
    s = make_scheduler(budget=100, chunked=False)  # max_num_seqs 8
    for i in range(16):
        pooling(s, f"p{i}", 4, "MEAN")
    first = s.schedule()
    second = s.schedule()  # scheduled ahead, before the first step lands (async scheduling)
    assert [x.request_id for x in first.scheduled] == [f"p{i}" for i in range(8)]
    assert [x.request_id for x in second.scheduled] == [f"p{i}" for i in range(8, 16)]


def test_an_encoders_requests_take_no_kv_blocks():
    cache = CacheConfig(block_size=4, enable_prefix_caching=False)
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=100, max_num_seqs=8, enable_chunked_prefill=False), cache,
                  256, 4, uses_kv_cache=False)  # 4 blocks would hold 16 tokens: far fewer than the step runs
    for i in range(5):
        pooling(s, f"p{i}", 9, "MEAN")
    out = s.schedule()
    assert [(x.num_new_tokens, x.new_block_ids) for x in out.scheduled] == [(9, [])] * 5
    assert s.kv.pool.num_free_blocks == 4
    s.update_from_output(out, StepResult())
    assert not s.has_requests() and s.num_awaiting_pooled == 0

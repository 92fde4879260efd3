"""The scheduler: token budget, decodes before prefills, chunking, sequence cap, preemption order."""

from __future__ import annotations

from loomserve.platform.config import CacheConfig, SchedulerConfig
from loomserve.platform.request import Request, RequestStatus, SamplingParams
from loomserve.platform.scheduler import Scheduler
from loomserve.platform.step import StepResult


def make_scheduler(num_blocks=64, block_size=4, budget=32, max_seqs=8) -> Scheduler:
    cache = CacheConfig(block_size=block_size, enable_prefix_caching=True)
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs), cache, 256, num_blocks)


def add(s: Scheduler, request_id: str, n: int, max_tokens: int = 8) -> Request:
    req = Request(request_id, list(range(100, 100 + n)), SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    s.add_request(req)
    return req


def run_step(s: Scheduler, token: int = 7):
    out = s.schedule()
    s.update_from_output(out, StepResult({x.request_id: [token] for x in out.scheduled if x.samples}))
    return out


def test_long_prompt_is_chunked_to_the_budget():
    s = make_scheduler(budget=10)
    req = add(s, "a", 25)
    assert [x.num_new_tokens for x in run_step(s).scheduled] == [10]
    assert [x.num_new_tokens for x in run_step(s).scheduled] == [10]
    assert [x.num_new_tokens for x in run_step(s).scheduled] == [5]
    assert req.output_token_ids == [7]


def test_running_decodes_come_before_new_prefills():
    s = make_scheduler(budget=10)
    add(s, "a", 4)
    run_step(s)
    add(s, "b", 30)
    out = run_step(s)
    assert [(x.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("b", 9)]


def test_max_num_seqs_caps_running_requests():
    s = make_scheduler(max_seqs=2)
    for i in range(3):
        add(s, str(i), 3)
    out = run_step(s)
    assert len(out.scheduled) == 2 and len(s.waiting) == 1


def test_preemption_evicts_the_latest_admitted_request():
    s = make_scheduler(num_blocks=4, block_size=4, budget=64)
    a, b = add(s, "a", 7, max_tokens=20), add(s, "b", 7, max_tokens=20)
    run_step(s)
    while not s.total_preemptions:
        run_step(s)
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert a.status == RequestStatus.RUNNING


def test_finished_requests_free_their_blocks():
    s = make_scheduler()
    req = add(s, "a", 5, max_tokens=2)
    run_step(s)
    run_step(s)
    assert req.status == RequestStatus.FINISHED_LENGTH
    assert s.kv.pool.num_free_blocks == 64 and not s.has_requests()


def test_abort_frees_blocks_at_once():
    s = make_scheduler()
    add(s, "a", 9)
    run_step(s)
    s.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert s.kv.pool.num_free_blocks == 64 and not s.has_requests()


def test_eos_stops_only_after_min_tokens():
    s = make_scheduler()
    req = Request("a", [1, 2, 3], SamplingParams(max_tokens=8, min_tokens=2), eos_token_id=7)
    s.add_request(req)
    run_step(s, token=7)
    assert not req.status.finished
    run_step(s, token=7)
    assert req.status == RequestStatus.FINISHED_STOPPED


def test_step_stats_count_a_prompt_once_it_is_done_and_every_generated_token():
    s = make_scheduler(budget=10)
    add(s, "a", 4)
    add(s, "b", 12)
    run_step(s)  # a's whole prompt and its first token; b's first chunk of 6
    assert s.stats().num_iteration_tokens == 4 + 1
    run_step(s)  # a decodes; b's prompt ends with its first token
    assert s.stats().num_iteration_tokens == 1 + 12 + 1
    assert s.stats().num_iteration_tokens == 0  # taken by the report before

"""Scheduling with adapters: at most max_loras distinct adapters run in any step, a request waiting for a slot
is never starved by a stream of other adapters' requests, and one waiting for its weights holds up no one."""

from __future__ import annotations

from loomserve.adapters.request import LoRARequest
from loomserve.adapters.scheduling import LoRAAdmission
from loomserve.platform.config import CacheConfig, SchedulerConfig
from loomserve.platform.kv_cache import KVCacheManager
from loomserve.platform.request import Request, SamplingParams
from loomserve.platform.scheduler import Scheduler
from loomserve.platform.step import ScheduledStep, StepResult

LORAS = {i: LoRARequest(f"lora{i}", i, f"/adapters/{i}") for i in range(1, 6)}


def make_scheduler(max_loras: int, cached: tuple[int, ...] = tuple(LORAS), max_seqs: int = 16) -> Scheduler:
    """`cached`: the adapters the runner reports in its host cache."""
    cache = CacheConfig(block_size=4, enable_prefix_caching=True)
    config = SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=max_seqs)
    s = Scheduler(config, cache, 512, 256, [LoRAAdmission(max_loras)])
    report_cached(s, cached)
    return s


def report_cached(s: Scheduler, cached) -> None:
    s.update_features(StepResult(features={"lora": {"cached": list(cached), "failed": {}}}))


def add(s: Scheduler, request_id: str, lora: int | None, max_tokens: int = 4) -> Request:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    req = Request(request_id, [1, 2, 3, 4, 5], params, lora_request=LORAS.get(lora))
    s.add_request(req)
    return req


def run_step(s: Scheduler) -> tuple[ScheduledStep, list[Request]]:
    """The step, and its requests in order."""
    out = s.schedule()
    requests = [s.requests[x.request_id] for x in out.scheduled]
    s.update_from_output(out, StepResult({x.request_id: [7] for x in out.scheduled if x.samples}))
    return out, requests


def adapters_of(requests: list[Request]) -> set[int]:
    return {r.lora_request.lora_int_id for r in requests if r.lora_request is not None}


def active_loras(out: ScheduledStep) -> set[int]:
    return {lora_id for _, lora_id, _ in out.features["lora"]["active"]}


def test_a_step_holds_at_most_max_loras_adapters_and_base_requests_always_run():
    s = make_scheduler(max_loras=2)
    for i in range(12):
        add(s, f"r{i}", [1, 2, 3, None][i % 4])
    first, requests = run_step(s)
    assert adapters_of(requests) == {1, 2}
    # r2 (adapter 3) found no slot, so adapter 1 (fewest running) drains: r4 and r8 wait; base and 2 go on.
    assert {r.request_id for r in requests} == {"r0", "r1", "r3", "r5", "r7", "r9", "r11"}
    assert active_loras(first) == {1, 2}
    seen = set()
    while s.has_requests():
        out, requests = run_step(s)
        assert len(adapters_of(requests)) <= 2 and len(active_loras(out)) <= 2
        seen |= adapters_of(requests)
    assert seen == {1, 2, 3}


def test_a_blocked_adapter_is_not_starved_by_a_stream_of_other_requests():
    """One slot, adapter 1 keeps getting new requests; adapter 2's request still starts, within a few steps."""
    s = make_scheduler(max_loras=1)
    add(s, "first", 1, max_tokens=3)
    run_step(s)
    blocked = add(s, "blocked", 2)
    for step in range(20):
        add(s, f"more{step}", 1, max_tokens=3)
        _, requests = run_step(s)
        if blocked in requests:
            break
    else:
        raise AssertionError("the request for adapter 2 never started")
    assert step <= 4  # adapter 1 was drained: only its already running requests finished first
    assert adapters_of(requests) == {2}


def test_a_request_whose_adapter_is_loading_waits_without_holding_up_others():
    s = make_scheduler(max_loras=2, cached=(1,))
    loading = add(s, "loading", 2)
    add(s, "ready", 1)
    add(s, "base", None)
    out, requests = run_step(s)
    assert {r.request_id for r in requests} == {"ready", "base"}
    assert list(s.waiting) == [loading]
    assert out.features["lora"]["load"] == [LORAS[2].to_wire()]  # the runner is asked to read it
    report_cached(s, (1, 2))
    _, requests = run_step(s)
    assert [r for r in requests if r.lora_request] == [s.requests["ready"], loading]


def test_the_requests_of_an_adapter_that_fails_to_load_end_aborted():
    s = make_scheduler(max_loras=2, cached=())
    broken = add(s, "broken", 2)
    run_step(s)
    refused = s.update_features(StepResult(features={"lora": {"cached": [], "failed": {"2": "no such folder"}}}))
    assert refused == [broken] and broken.finish_reason == "abort" and not s.has_requests()


def test_prefix_cache_keys_depend_on_the_adapter():
    kv = KVCacheManager(num_blocks=32, block_size=4, enable_caching=True)
    tokens = list(range(100, 113))

    def request(request_id: str, lora: int | None) -> Request:
        return Request(request_id, tokens, SamplingParams(), lora_request=LORAS.get(lora))

    first = request("a", 1)
    assert kv.allocate_slots(first, len(tokens))
    assert kv.get_computed_blocks(request("same adapter", 1))[1] == 12
    assert kv.get_computed_blocks(request("other adapter", 2))[1] == 0
    assert kv.get_computed_blocks(request("base", None))[1] == 0

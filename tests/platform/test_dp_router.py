"""The data-parallel router: load as vLLM scores it (waiting x 4 + running), prefix-cache affinity as SGLang's
cache-aware router keeps it (what each engine was sent, keyed as the engines' prefix caches key it), and load
winning over affinity once the engines drift too far apart."""

from __future__ import annotations

import time

import pytest

from loomserve.adapters.request import LoRARequest
from loomserve.platform.dp_router import DPRouter
from loomserve.platform.messages import EngineCoreRequest
from loomserve.platform.stats import SchedulerStats

SHARED = list(range(100, 164))  # 64 tokens: 4 blocks of 16


def request(tokens: list[int], lora: LoRARequest | None = None) -> EngineCoreRequest:
    return EngineCoreRequest("r", tokens, None, None, time.time(), lora_request=lora)


def test_load_score_is_waiting_times_four_plus_running() -> None:
    router = DPRouter(2, block_size=16)
    router.report(0, SchedulerStats(num_running=7, num_waiting=0))  # score 7
    router.report(1, SchedulerStats(num_running=0, num_waiting=2))  # score 8
    assert router.route(request(list(range(5)))) == 0


def test_requests_sharing_a_prefix_follow_it_to_one_engine() -> None:
    router = DPRouter(2, block_size=16)
    first = router.route(request(SHARED + [1, 2, 3]))
    other = router.route(request(list(range(500, 540))))  # unrelated: the other, less loaded engine
    assert other != first
    assert [router.route(request(SHARED + [9] * n)) for n in (1, 20, 40)] == [first] * 3


def test_round_robin_ignores_prefixes() -> None:
    router = DPRouter(3, block_size=16, routing="round_robin")
    assert [router.route(request(SHARED)) for _ in range(4)] == [0, 1, 2, 0]


def test_a_prefix_under_another_adapter_is_not_an_affinity() -> None:
    router = DPRouter(2, block_size=16)
    first = router.route(request(SHARED))
    assert router.route(request(SHARED, LoRARequest("a", 1, "/a"))) != first


def test_load_beyond_the_margin_overrides_affinity() -> None:
    router = DPRouter(2, block_size=16, balance_margin=8)
    first = router.route(request(SHARED))
    router.report(first, SchedulerStats(num_running=4, num_waiting=2))  # score 12 vs 0
    assert router.route(request(SHARED)) != first


def test_unknown_routing_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown data-parallel routing 'random'"):
        DPRouter(2, block_size=16, routing="random")

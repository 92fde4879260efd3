"""The front end's view of data-parallel engines: one server's gauges over every engine, counters per step."""

from __future__ import annotations

from loomserve.platform.async_llm import _across_engines
from loomserve.platform.stats import SchedulerStats


def test_gauges_cover_every_engine_and_counters_stay_the_steps() -> None:
    latest = [SchedulerStats(num_running=3, num_waiting=1, kv_cache_usage=0.5),
              SchedulerStats(num_running=2, num_waiting=0, kv_cache_usage=0.1, prefix_cache_hits=32)]
    merged = _across_engines(latest, latest[1])
    assert (merged.num_running, merged.num_waiting) == (5, 1)
    assert abs(merged.kv_cache_usage - 0.3) < 1e-9
    assert merged.prefix_cache_hits == 32  # the reporting engine's step, counted once

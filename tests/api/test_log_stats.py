"""The periodic stats line: what a model did since the last line, and silence while it stays idle."""

from __future__ import annotations

from loomserve.api.log_stats import LoggingStatLogger, RequestTotals
from loomserve.platform.stats import IterationStats, SchedulerStats


def test_the_line_sums_the_period_and_reads_the_latest_gauges():
    stats = LoggingStatLogger("chat")
    stats.since = 0.0
    stats.record(SchedulerStats(num_running=2, num_waiting=1, kv_cache_usage=0.25, prefix_cache_queries=100,
                                prefix_cache_hits=40), IterationStats(num_prompt_tokens=300, num_generation_tokens=20))
    stats.record(None, IterationStats(num_generation_tokens=30, finished_reasons=["stop"]))
    assert stats.line(now=10.0) == (
        "chat: prompt throughput 30.0 tokens/s, generation throughput 5.0 tokens/s, finished 1 requests, running 2, "
        "waiting 1, KV cache 25.0% used, prefix cache hit rate 40.0%")


def test_an_idle_model_logs_one_line_then_stays_quiet():
    stats = LoggingStatLogger("chat")
    assert stats.line() is not None
    assert stats.line() is None
    stats.record(None, IterationStats(num_prompt_tokens=5))
    assert stats.line() is not None


def test_with_several_api_processes_the_line_counts_every_processs_requests():
    totals = [RequestTotals(prompt_tokens=100, generation_tokens=10, finished=1)]
    stats = LoggingStatLogger("chat", server_totals=lambda: totals[-1])
    stats.since = 0.0
    stats.record(SchedulerStats(num_running=1), IterationStats(num_prompt_tokens=999))  # in the totals already
    totals.append(RequestTotals(prompt_tokens=400, generation_tokens=60, finished=3))
    assert stats.line(now=10.0).startswith("chat: prompt throughput 30.0 tokens/s, generation throughput 5.0 tokens/s, "
                                           "finished 2 requests, running 1")

"""The periodic stats line while serving, one per model with traffic (vLLM's LoggingStatLogger): throughput,
running and waiting requests, KV-cache use and prefix-cache hit rate. `--disable-log-stats` turns it off;
LOOMSERVE_LOG_STATS_INTERVAL sets the period (seconds, default 10). With several API processes one of them logs the
line, for the whole server: the requests' counts come from every process's metrics, the engine's state from the
reports every process gets."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from loomserve.platform.stats import IterationStats, SchedulerStats

logger = logging.getLogger("loomserve.stats")

DEFAULT_INTERVAL_S = 10.0


def log_stats_interval() -> float:
    return float(os.environ.get("LOOMSERVE_LOG_STATS_INTERVAL", DEFAULT_INTERVAL_S))


@dataclass(frozen=True)
class RequestTotals:
    """What a server's requests of one model have counted so far."""

    prompt_tokens: float = 0.0
    generation_tokens: float = 0.0
    finished: float = 0.0


class LoggingStatLogger:
    """A StatLogger that sums what one model did since its last line; with `server_totals` (several API processes,
    each counting its own requests) the requests' counts are the whole server's, read at each line."""

    def __init__(self, model_name: str, server_totals: Callable[[], RequestTotals] | None = None) -> None:
        self.model_name = model_name
        self.latest = SchedulerStats()
        self.server_totals = server_totals
        self._last_totals = server_totals() if server_totals is not None else RequestTotals()
        self._reset(time.monotonic())

    def _reset(self, now: float) -> None:
        self.since = now
        self.prompt_tokens = self.generation_tokens = self.finished = 0
        self.prefix_queries = self.prefix_hits = 0
        self.reported_idle = False

    def record(self, scheduler_stats: SchedulerStats | None, iteration_stats: IterationStats | None) -> None:
        if scheduler_stats is not None:
            self.latest = scheduler_stats
            self.prefix_queries += scheduler_stats.prefix_cache_queries
            self.prefix_hits += scheduler_stats.prefix_cache_hits
        if iteration_stats is not None and self.server_totals is None:
            self.prompt_tokens += iteration_stats.num_prompt_tokens
            self.generation_tokens += iteration_stats.num_generation_tokens
            self.finished += len(iteration_stats.finished_reasons)

    def line(self, now: float | None = None) -> str | None:
        """The line for the period that ends now, then a new period; None while idle (after one idle line)."""
        now = time.monotonic() if now is None else now
        if self.server_totals is not None:
            self._take_server_totals()
        busy = self.prompt_tokens or self.generation_tokens or self.latest.num_running or self.latest.num_waiting
        if not busy and self.reported_idle:
            self.since = now
            return None
        seconds = max(now - self.since, 1e-9)
        hit_rate = 100 * self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0
        text = (f"{self.model_name}: prompt throughput {self.prompt_tokens / seconds:.1f} tokens/s, generation "
                f"throughput {self.generation_tokens / seconds:.1f} tokens/s, finished {self.finished} requests, "
                f"running {self.latest.num_running}, waiting {self.latest.num_waiting}, KV cache "
                f"{100 * self.latest.kv_cache_usage:.1f}% used, prefix cache hit rate {hit_rate:.1f}%")
        self._reset(now)
        self.reported_idle = not busy
        return text


    def _take_server_totals(self) -> None:
        totals = self.server_totals()
        self.prompt_tokens = int(totals.prompt_tokens - self._last_totals.prompt_tokens)
        self.generation_tokens = int(totals.generation_tokens - self._last_totals.generation_tokens)
        self.finished = int(totals.finished - self._last_totals.finished)
        self._last_totals = totals


async def log_periodically(stat_loggers: Sequence[LoggingStatLogger], interval_s: float) -> None:
    """Every `interval_s`, each model's line (until cancelled)."""
    while True:
        await asyncio.sleep(interval_s)
        for stat_logger in stat_loggers:
            text = stat_logger.line()
            if text is not None:
                logger.info(text)

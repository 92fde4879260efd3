"""Numbers the engine reports each step, for logs and Prometheus."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SchedulerStats:
    """Engine-side gauges and counters, sent with every batch of outputs."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache this step
    prefix_cache_hits: int = 0  # of those, tokens found
    num_preemptions: int = 0  # preemptions this step


@dataclass
class IterationStats:
    """Front-end measurements over one batch of engine outputs (seconds)."""

    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    e2e_latencies: list[float] = field(default_factory=list)
    finished_reasons: list[str] = field(default_factory=list)

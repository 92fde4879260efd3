"""Prometheus metrics with vLLM's names (prefix `loomserve:`): a StatLogger fed by AsyncLLM, read at /metrics.

Each logger owns its CollectorRegistry, so several servers in one process do not clash.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from loomserve.platform.stats import IterationStats, SchedulerStats, SpecDecodingStats

CONTENT_TYPE = CONTENT_TYPE_LATEST
FINISHED_REASONS = ("stop", "length", "abort")

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                240.0, 480.0, 960.0, 1920.0, 7680.0)


class PrometheusStatLogger:
    """Gauges, counters and latency histograms for one served model."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        common = {"labelnames": ["model_name"], "registry": self.registry}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"loomserve:{name}", doc, **common).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"loomserve:{name}", doc, **common).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"loomserve:{name}", doc, buckets=buckets, **common).labels(model_name)

        self.num_requests_running = gauge("num_requests_running", "Requests in the running batch.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = all).")
        self.prefix_cache_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.num_preemptions = counter("num_preemptions", "Requests preempted to free KV-cache blocks.")
        self.model_name = model_name
        self.spec_decode_num_drafts = counter("spec_decode_num_drafts", "Number of spec decoding drafts.")
        self.spec_decode_num_draft_tokens = counter("spec_decode_num_draft_tokens", "Number of draft tokens.")
        self.spec_decode_num_accepted_tokens = counter("spec_decode_num_accepted_tokens",
                                                       "Number of accepted tokens.")
        self.spec_decode_num_accepted_tokens_per_pos = Counter(
            "loomserve:spec_decode_num_accepted_tokens_per_pos", "Accepted tokens, per draft position.",
            labelnames=["model_name", "position"], registry=self.registry,
        )
        self.request_success = Counter(
            "loomserve:request_success", "Finished requests, by finish reason.",
            labelnames=["model_name", "finished_reason"], registry=self.registry,
        )
        for reason in FINISHED_REASONS:  # exported as 0 before the first request finishes
            self.request_success.labels(model_name=model_name, finished_reason=reason)
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Time from arrival to the first generated token.", _TTFT_BUCKETS
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Time between consecutive generated tokens.", _ITL_BUCKETS
        )
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds", "Time from arrival to the last token of a request.", _E2E_BUCKETS
        )

    def record(self, scheduler_stats: SchedulerStats | None, iteration_stats: IterationStats | None) -> None:
        if scheduler_stats is not None:
            self._record_scheduler(scheduler_stats)
        if iteration_stats is not None:
            self._record_iteration(iteration_stats)

    def _record_scheduler(self, stats: SchedulerStats) -> None:
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        self.prefix_cache_queries.inc(stats.prefix_cache_queries)
        self.prefix_cache_hits.inc(stats.prefix_cache_hits)
        self.num_preemptions.inc(stats.num_preemptions)
        if stats.spec_decoding is not None:
            self._record_spec_decoding(stats.spec_decoding)

    def _record_spec_decoding(self, stats: SpecDecodingStats) -> None:
        self.spec_decode_num_drafts.inc(stats.num_drafts)
        self.spec_decode_num_draft_tokens.inc(stats.num_draft_tokens)
        self.spec_decode_num_accepted_tokens.inc(stats.num_accepted_tokens)
        for position, accepted in enumerate(stats.num_accepted_tokens_per_pos):
            self.spec_decode_num_accepted_tokens_per_pos.labels(model_name=self.model_name,
                                                                position=str(position)).inc(accepted)

    def _record_iteration(self, stats: IterationStats) -> None:
        self.prompt_tokens.inc(stats.num_prompt_tokens)
        self.generation_tokens.inc(stats.num_generation_tokens)
        for seconds in stats.time_to_first_tokens:
            self.time_to_first_token.observe(seconds)
        for seconds in stats.inter_token_latencies:
            self.inter_token_latency.observe(seconds)
        for seconds in stats.e2e_latencies:
            self.e2e_request_latency.observe(seconds)
        for reason in stats.finished_reasons:
            self.request_success.labels(model_name=self.model_name, finished_reason=reason).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

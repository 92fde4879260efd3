"""Prometheus metrics with vLLM's names, labels (`model_name`, `engine`) and buckets, under the prefix `loomserve:`
(MetricsGroup adds `vllm:` copies with --metrics-compat vllm): a StatLogger fed by AsyncLLM, read at /metrics.

Each logger owns its CollectorRegistry, so several servers in one process do not clash. With several API processes
(`--api-server-count`), prometheus_client's multiprocess mode sums their counters and histograms (every process
counts its own requests) and `MetricsGroup` reads them all; what the engine reports each step (gauges, prefix-cache
and preemption counters, the step's tokens) reaches every process but is recorded by the first one only, so it counts
once.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from loomserve.platform.config.model import parse_model_len
from loomserve.platform.stats import FinishedRequestStats, IterationStats, SchedulerStats, SpecDecodingStats

if TYPE_CHECKING:
    from loomserve.platform.config import EngineArgs

CONTENT_TYPE = CONTENT_TYPE_LATEST
PREFIX = "loomserve:"
FINISHED_REASONS = ("stop", "length", "abort")
ENGINE = "0"  # the `engine` label: one series per served model (data-parallel engines are reported together)
DEFAULT_MAX_MODEL_LEN = 131072
# Across API processes a gauge shows the value last set: one process sets the engine's gauges, and the info series
# are the same in all.
GAUGE_MODE = "mostrecent"  # the token-count buckets' range when the context length is the model's default

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                240.0, 480.0, 960.0, 1920.0, 7680.0)
_ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_N_BUCKETS = (1, 2, 5, 10, 20)


def buckets_1_2_5(largest: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `largest` (vLLM's buckets of token counts)."""
    out, scale = [], 1
    while True:
        for step in (1, 2, 5):
            if step * scale > largest:
                return tuple(out)
            out.append(step * scale)
        scale *= 10


class PrometheusStatLogger:
    """Gauges, counters and histograms for one served model (`args`: its engine flags, for the info series and the
    token-count buckets)."""

    def __init__(self, model_name: str, args: EngineArgs | None = None, records_engine_steps: bool = True) -> None:
        self.registry = CollectorRegistry()
        self.records_engine_steps = records_engine_steps  # False: another API process records the engine's reports
        self.model_name = model_name
        self.labels = {"model_name": model_name, "engine": ENGINE}
        token_buckets = buckets_1_2_5(_max_model_len(args))

        def labelled(kind: type, name: str, doc: str, **kwargs: object) -> Counter | Gauge | Histogram:
            return kind(PREFIX + name, doc, labelnames=list(self.labels), registry=self.registry,
                        **kwargs).labels(**self.labels)

        def gauge(name: str, doc: str) -> Gauge:
            return labelled(Gauge, name, doc, multiprocess_mode=GAUGE_MODE)

        def counter(name: str, doc: str) -> Counter:
            return labelled(Counter, name, doc)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return labelled(Histogram, name, doc, buckets=buckets)

        self.num_requests_running = gauge("num_requests_running", "Requests in the running batch.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = all).")
        self.gpu_cache_usage = gauge("gpu_cache_usage_perc", "Fraction of KV-cache blocks in use (vLLM's older "
                                     "name of kv_cache_usage_perc, which dashboards still query).")
        self.prefix_cache_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.num_preemptions = counter("num_preemptions", "Requests preempted to free KV-cache blocks.")
        self.spec_decode_num_drafts = counter("spec_decode_num_drafts", "Number of spec decoding drafts.")
        self.spec_decode_num_draft_tokens = counter("spec_decode_num_draft_tokens", "Number of draft tokens.")
        self.spec_decode_num_accepted_tokens = counter("spec_decode_num_accepted_tokens",
                                                       "Number of accepted tokens.")
        self.spec_decode_num_accepted_tokens_per_pos = Counter(
            PREFIX + "spec_decode_num_accepted_tokens_per_pos", "Accepted tokens, per draft position.",
            labelnames=[*self.labels, "position"], registry=self.registry,
        )
        self.request_success = Counter(
            PREFIX + "request_success", "Finished requests, by finish reason.",
            labelnames=[*self.labels, "finished_reason"], registry=self.registry,
        )
        for reason in FINISHED_REASONS:  # exported as 0 before the first request finishes
            self.request_success.labels(**self.labels, finished_reason=reason)
        self.iteration_tokens = histogram("iteration_tokens_total", "Tokens per engine step (prompt + generated).",
                                          _ITERATION_TOKEN_BUCKETS)
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Time from arrival to the first generated token.", _TTFT_BUCKETS
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Time between consecutive generated tokens.", _ITL_BUCKETS
        )
        self.time_per_output_token = histogram(
            "time_per_output_token_seconds", "Time between consecutive generated tokens (vLLM's older name of "
            "inter_token_latency_seconds).", _ITL_BUCKETS
        )
        self.request_time_per_output_token = histogram(
            "request_time_per_output_token_seconds", "Per request: decode time over its generated tokens after the "
            "first.", _ITL_BUCKETS
        )
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds", "Time from arrival to the last token of a request.", _E2E_BUCKETS
        )
        self.request_queue_time = histogram(
            "request_queue_time_seconds", "Time from arrival to first being scheduled.", _E2E_BUCKETS)
        self.request_prefill_time = histogram(
            "request_prefill_time_seconds", "Time from first being scheduled to the first token.", _E2E_BUCKETS)
        self.request_decode_time = histogram(
            "request_decode_time_seconds", "Time from the first token to the last.", _E2E_BUCKETS)
        self.request_inference_time = histogram(
            "request_inference_time_seconds", "Time from first being scheduled to the last token.", _E2E_BUCKETS)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens per finished request.",
                                               token_buckets)
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Generated tokens per finished request (all its completions).", token_buckets)
        self.request_max_num_generation_tokens = histogram(
            "request_max_num_generation_tokens", "Generated tokens of a finished request's longest completion.",
            token_buckets)
        self.request_params_n = histogram("request_params_n", "The `n` of finished requests.", _N_BUCKETS)
        self.request_params_max_tokens = histogram("request_params_max_tokens", "The `max_tokens` of finished "
                                                   "requests.", token_buckets)
        self._info_series(args)

    def _info_series(self, args: EngineArgs | None) -> None:
        """vLLM's info gauges: the cache config (value 1) and the adapters in use (value: when they last changed)."""
        cache = {"block_size": 16, "cache_dtype": "auto", "enable_prefix_caching": True,
                 "gpu_memory_utilization": 0.9, "num_gpu_blocks_override": None}
        if args is not None:
            cache = {"block_size": args.block_size, "cache_dtype": args.kv_cache_dtype,
                     "enable_prefix_caching": args.enable_prefix_caching,
                     "gpu_memory_utilization": args.gpu_memory_utilization,
                     "num_gpu_blocks_override": args.num_gpu_blocks_override}
        info = Gauge(PREFIX + "cache_config_info", "The KV cache's configuration.", labelnames=list(cache),
                     registry=self.registry, multiprocess_mode=GAUGE_MODE)
        info.labels(**{k: str(v) for k, v in cache.items()}).set(1)
        self.max_lora = str(args.max_loras if args is not None and args.enable_lora else 0)
        self.lora_requests_info = Gauge(
            PREFIX + "lora_requests_info", "Adapters of running and waiting requests (value: when they last changed).",
            labelnames=["max_lora", "waiting_lora_adapters", "running_lora_adapters"], registry=self.registry,
            multiprocess_mode=GAUGE_MODE,
        )
        self._lora_labels: tuple[str, str] | None = None
        self._record_adapters({}, {})

    def record(self, scheduler_stats: SchedulerStats | None, iteration_stats: IterationStats | None) -> None:
        if scheduler_stats is not None and self.records_engine_steps:
            self._record_scheduler(scheduler_stats)
        if iteration_stats is not None:
            self._record_iteration(iteration_stats)

    def _record_scheduler(self, stats: SchedulerStats) -> None:
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        self.gpu_cache_usage.set(stats.kv_cache_usage)
        self.prefix_cache_queries.inc(stats.prefix_cache_queries)
        self.prefix_cache_hits.inc(stats.prefix_cache_hits)
        self.num_preemptions.inc(stats.num_preemptions)
        if stats.num_iteration_tokens:  # one observation per engine step, whichever API processes sent its requests
            self.iteration_tokens.observe(stats.num_iteration_tokens)
        self._record_adapters(stats.waiting_lora_adapters, stats.running_lora_adapters)
        if stats.spec_decoding is not None:
            self._record_spec_decoding(stats.spec_decoding)

    def _record_adapters(self, waiting: dict[str, int], running: dict[str, int]) -> None:
        labels = (",".join(sorted(waiting)), ",".join(sorted(running)))
        if labels != self._lora_labels:
            self._lora_labels = labels
            self.lora_requests_info.labels(max_lora=self.max_lora, waiting_lora_adapters=labels[0],
                                           running_lora_adapters=labels[1]).set(time.time())

    def _record_spec_decoding(self, stats: SpecDecodingStats) -> None:
        self.spec_decode_num_drafts.inc(stats.num_drafts)
        self.spec_decode_num_draft_tokens.inc(stats.num_draft_tokens)
        self.spec_decode_num_accepted_tokens.inc(stats.num_accepted_tokens)
        for position, accepted in enumerate(stats.num_accepted_tokens_per_pos):
            self.spec_decode_num_accepted_tokens_per_pos.labels(**self.labels, position=str(position)).inc(accepted)

    def _record_iteration(self, stats: IterationStats) -> None:
        self.prompt_tokens.inc(stats.num_prompt_tokens)
        self.generation_tokens.inc(stats.num_generation_tokens)
        for seconds in stats.time_to_first_tokens:
            self.time_to_first_token.observe(seconds)
        for seconds in stats.inter_token_latencies:
            self.inter_token_latency.observe(seconds)
            self.time_per_output_token.observe(seconds)
        for seconds in stats.e2e_latencies:
            self.e2e_request_latency.observe(seconds)
        for reason in stats.finished_reasons:
            self.request_success.labels(**self.labels, finished_reason=reason).inc()
        for finished in stats.finished_requests:
            self._record_finished(finished)

    def _record_finished(self, stats: FinishedRequestStats) -> None:
        self.request_queue_time.observe(stats.queued_time)
        self.request_prefill_time.observe(stats.prefill_time)
        self.request_decode_time.observe(stats.decode_time)
        self.request_inference_time.observe(stats.inference_time)
        self.request_prompt_tokens.observe(stats.num_prompt_tokens)
        self.request_generation_tokens.observe(stats.num_generation_tokens)
        self.request_max_num_generation_tokens.observe(stats.max_num_generation_tokens)
        self.request_params_n.observe(stats.n)
        if stats.max_tokens is not None:
            self.request_params_max_tokens.observe(stats.max_tokens)
        if stats.mean_time_per_output_token is not None:
            self.request_time_per_output_token.observe(stats.mean_time_per_output_token)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


def _max_model_len(args: EngineArgs | None) -> int:
    return (parse_model_len(args.max_model_len) if args is not None else None) or DEFAULT_MAX_MODEL_LEN

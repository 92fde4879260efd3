"""One /metrics page for several served models: each model's PrometheusStatLogger keeps its own registry; their
metric families are merged (same name, samples told apart by `model_name`). With --metrics-compat vllm every
family is also emitted under vLLM's prefix `vllm:`, so dashboards and alerts written for vLLM find their series.
With several API processes (PROMETHEUS_MULTIPROC_DIR set), the families are those of every process, merged by
prometheus_client's multiprocess collector."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from loomserve.api.log_stats import RequestTotals
from loomserve.api.metrics import PREFIX, PrometheusStatLogger

COMPAT_PREFIXES = {"vllm": "vllm:"}  # --metrics-compat choice -> the prefix its dashboards query


class MetricsGroup:
    def __init__(self, loggers: Sequence[PrometheusStatLogger], compat: Sequence[str] = ()) -> None:
        self.loggers = list(loggers)
        self.prefixes = [PREFIX, *(COMPAT_PREFIXES[name] for name in compat)]
        self.sources = [stat_logger.registry for stat_logger in self.loggers]
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            self.sources = [all_processes()]
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for source in self.sources:
            for metric in source.collect():
                for prefix in self.prefixes:
                    name = renamed(metric.name, prefix)
                    family = families.setdefault(name, Metric(name, metric.documentation, metric.type, metric.unit))
                    family.samples.extend(s._replace(name=renamed(s.name, prefix)) for s in metric.samples)
        return families.values()

    def request_totals(self, model_name: str) -> RequestTotals:
        """What every API process has counted for `model_name`: prompt and generated tokens, finished requests."""
        fields = {PREFIX + "prompt_tokens_total": "prompt_tokens", PREFIX + "generation_tokens_total":
                  "generation_tokens", PREFIX + "request_success_total": "finished"}
        sums = dict.fromkeys(fields.values(), 0.0)
        for source in self.sources:
            for metric in source.collect():
                for sample in metric.samples:
                    if sample.name in fields and sample.labels.get("model_name") == model_name:
                        sums[fields[sample.name]] += sample.value
        return RequestTotals(**sums)

    def render(self) -> bytes:
        """The Prometheus text exposition of every model's metrics."""
        return generate_latest(self.registry)


def all_processes() -> CollectorRegistry:
    """A registry reading every API process's metrics (prometheus_client's multiprocess mode)."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


def renamed(name: str, prefix: str) -> str:
    """A `loomserve:` metric or sample name under `prefix`."""
    return prefix + name.removeprefix(PREFIX)


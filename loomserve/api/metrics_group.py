"""One /metrics page for several served models: each model's PrometheusStatLogger keeps its own registry; their
metric families are merged (same name, samples told apart by `model_name`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from loomserve.api.metrics import PrometheusStatLogger


class MetricsGroup:
    def __init__(self, loggers: Sequence[PrometheusStatLogger]) -> None:
        self.loggers = list(loggers)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for stat_logger in self.loggers:
            for metric in stat_logger.registry.collect():
                family = families.setdefault(
                    metric.name, Metric(metric.name, metric.documentation, metric.type, metric.unit)
                )
                family.samples.extend(metric.samples)
        return families.values()

    def render(self) -> bytes:
        """The Prometheus text exposition of every model's metrics."""
        return generate_latest(self.registry)

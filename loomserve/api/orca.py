"""ORCA load reports: a request carrying `endpoint-load-metrics-format: text|json` gets an `endpoint-load-metrics`
response header with the main model's KV-cache usage and waiting requests, as vLLM reports them to load balancers
(gateway-api-inference-extension, Envoy):

    endpoint-load-metrics: TEXT named_metrics.kv_cache_usage_perc=0.2, named_metrics.num_requests_waiting=0.0
    endpoint-load-metrics: JSON {"named_metrics": {"kv_cache_usage_perc": 0.2, "num_requests_waiting": 0.0}}

Other formats get no header."""

from __future__ import annotations

import json
from collections.abc import Callable

from prometheus_client import CollectorRegistry
from starlette.types import Scope

from loomserve.api.response_headers import Headers, request_header

FORMAT_HEADER = b"endpoint-load-metrics-format"
REPORT_HEADER = b"endpoint-load-metrics"
# ORCA's named metric -> the gauge it reads (vLLM's pair)
NAMED_METRICS = {"kv_cache_usage_perc": "loomserve:kv_cache_usage_perc",
                 "num_requests_waiting": "loomserve:num_requests_waiting"}


def orca_headers(registry: CollectorRegistry, model_name: str) -> Callable[[Scope], Headers]:
    """The middleware's header function over `model_name`'s gauges in `registry`."""

    def headers_for(scope: Scope) -> Headers:
        kind = (request_header(scope, FORMAT_HEADER) or "").strip().lower()
        if kind not in ("text", "json"):
            return []
        return [(REPORT_HEADER, orca_report(kind, gauge_values(registry, model_name)).encode())]

    return headers_for


def orca_report(kind: str, named: dict[str, float]) -> str:
    if kind == "json":
        return f"JSON {json.dumps({'named_metrics': named})}"
    return "TEXT " + ", ".join(f"named_metrics.{name}={value}" for name, value in named.items())


def gauge_values(registry: CollectorRegistry, model_name: str) -> dict[str, float]:
    """ORCA name -> the current value of its gauge for `model_name` (0.0 before the first engine step)."""
    wanted = {gauge: name for name, gauge in NAMED_METRICS.items()}
    values = dict.fromkeys(NAMED_METRICS, 0.0)
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name in wanted and sample.labels.get("model_name") == model_name:
                values[wanted[sample.name]] = float(sample.value)
    return values

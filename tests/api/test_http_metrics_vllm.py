"""/metrics carries vLLM's series with vLLM's names and labels (`model_name`, `engine`); with --metrics-compat vllm
they also appear under `vllm:`, so the queries of vLLM's published Grafana dashboard find every series."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loomserve.api.metrics import PrometheusStatLogger
from loomserve.api.metrics_group import MetricsGroup
from loomserve.platform.stats import FinishedRequestStats, IterationStats, SchedulerStats
from loomserve.testing.server import Server

DASHBOARD = json.loads((Path(__file__).parent / "vllm_grafana_metrics.json").read_text())


@pytest.fixture(scope="module")
def server(start_server) -> Iterator[Server]:
    with start_server("--metrics-compat", "vllm") as s:
        yield s


def samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def test_every_series_of_vllms_grafana_dashboard_is_in_metrics(server, http):
    found = samples(http.get("/metrics").text)
    missing = [name for name in DASHBOARD["names"] if name not in found]
    assert not missing
    for name in DASHBOARD["names"]:
        assert all(s.labels["model_name"] == server.model and s.labels["engine"] == "0" for s in found[name])


def test_a_finished_request_is_timed_by_phase_and_counted_by_its_parameters(server, http, client, model):
    before = samples(http.get("/metrics").text)
    client.completions.create(model=model, prompt="one two three", max_tokens=6, n=2,
                              extra_body={"ignore_eos": True})
    after = samples(http.get("/metrics").text)

    def grew(name: str, **labels: str) -> float:
        def value(found: dict[str, list]) -> float:
            return sum(s.value for s in found.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))
        return value(after) - value(before)

    for phase in ("queue", "prefill", "decode", "inference"):
        assert grew(f"vllm:request_{phase}_time_seconds_count") == 1
        assert grew(f"loomserve:request_{phase}_time_seconds_count") == 1
    queue, prefill, decode, inference = (grew(f"vllm:request_{p}_time_seconds_sum")
                                         for p in ("queue", "prefill", "decode", "inference"))
    assert queue >= 0 and prefill > 0 and decode > 0
    assert inference == pytest.approx(prefill + decode, abs=1e-3)
    assert inference <= grew("vllm:e2e_request_latency_seconds_sum")
    assert grew("vllm:request_generation_tokens_sum") == 12  # both completions
    assert grew("vllm:request_max_num_generation_tokens_sum") == 6
    assert grew("vllm:request_params_n_bucket", le="1.0") == 0 and grew("vllm:request_params_n_bucket", le="2.0") == 1
    assert grew("vllm:request_params_max_tokens_sum") == 6
    assert grew("vllm:request_prompt_tokens_count") == 1
    assert grew("vllm:iteration_tokens_total_count") >= 1
    # each of the n = 2 engine requests counts the prompt once it is done, as vLLM counts a child's
    assert grew("vllm:iteration_tokens_total_sum") == 2 * grew("vllm:prompt_tokens_total") + 12
    assert grew("vllm:request_time_per_output_token_seconds_count") == 1
    assert grew("vllm:inter_token_latency_seconds_count") == grew("vllm:time_per_output_token_seconds_count") > 0


def test_info_series_describe_the_cache_and_adapters(server, http):
    found = samples(http.get("/metrics").text)
    (cache,) = found["vllm:cache_config_info"]
    assert cache.value == 1 and cache.labels["block_size"] == "16" and cache.labels["enable_prefix_caching"] == "True"
    (lora,) = found["vllm:lora_requests_info"]
    assert lora.labels == {"max_lora": "0", "waiting_lora_adapters": "", "running_lora_adapters": ""}


def test_adapters_in_use_are_listed_in_lora_requests_info():
    logger = PrometheusStatLogger("m")
    logger.record(SchedulerStats(running_lora_adapters={"b": 1, "a": 2}, waiting_lora_adapters={"c": 1}), None)
    found = samples(MetricsGroup([logger], ["vllm"]).render().decode())
    labels = [s.labels for s in found["vllm:lora_requests_info"]]
    assert {"max_lora": "0", "waiting_lora_adapters": "c", "running_lora_adapters": "a,b"} in labels


def test_phases_of_a_request_follow_its_timestamps():
    stats = FinishedRequestStats.timed("stop", 10.0, 10.5, 11.0, 13.0, 13.5, num_prompt_tokens=4,
                                       num_generation_tokens=5, max_num_generation_tokens=5)
    assert (stats.queued_time, stats.prefill_time, stats.decode_time, stats.inference_time) == (0.5, 0.5, 2.0, 2.5)
    assert stats.e2e_latency == 3.5 and stats.mean_time_per_output_token == 0.5
    logger = PrometheusStatLogger("m")
    logger.record(None, IterationStats(finished_requests=[stats]))
    found = samples(logger.render().decode())
    assert found["loomserve:request_decode_time_seconds_sum"][0].value == 2.0
    assert "vllm:request_decode_time_seconds_sum" not in found  # the vllm: copies only with --metrics-compat

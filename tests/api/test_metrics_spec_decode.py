"""Speculative decoding's counters reach /metrics under vLLM's `spec_decode_*` names, from the scheduler stats as
they cross the engine process's wire; and `--speculative-config` is vLLM's JSON flag."""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families

from loomserve.api.cli import engine_args_from, make_parser
from loomserve.api.metrics import PrometheusStatLogger
from loomserve.platform.messages import EngineCoreOutputs, pack, unpack
from loomserve.platform.stats import SchedulerStats, SpecDecodingStats


def samples(logger: PrometheusStatLogger) -> dict[tuple[str, str | None], float]:
    text = logger.render().decode()
    return {(s.name, s.labels.get("position")): s.value
            for family in text_string_to_metric_families(text) for s in family.samples if "spec_decode" in s.name}


def test_spec_decode_counters_add_up_across_steps():
    stats = SpecDecodingStats()
    stats.observe(3, 2)
    stats.observe(2, 0)
    logger = PrometheusStatLogger("m")
    for _ in range(2):  # two steps' worth, each sent from the engine process
        sent = unpack(pack(EngineCoreOutputs([], SchedulerStats(spec_decoding=stats))))
        logger.record(sent.scheduler_stats, None)
    got = samples(logger)
    assert got[("loomserve:spec_decode_num_drafts_total", None)] == 4
    assert got[("loomserve:spec_decode_num_draft_tokens_total", None)] == 10
    assert got[("loomserve:spec_decode_num_accepted_tokens_total", None)] == 4
    per_position = {p: v for (name, p), v in got.items() if name.endswith("per_pos_total")}
    assert per_position == {"0": 2, "1": 2, "2": 0}


def test_speculative_config_flag_takes_vllms_json():
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}
    args = engine_args_from(make_parser().parse_args(["serve", "m", "--speculative-config", json.dumps(spec)]))
    assert json.loads(args.speculative_config) == spec

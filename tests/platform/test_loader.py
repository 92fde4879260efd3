"""Weight loading: single-file and sharded safetensors, dummy weights, and the errors a user can hit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from paged_batch import PagedRunner, load
from safetensors.torch import load_file, save_file

from loomserve.testing.checkpoints import tiny_checkpoint


def prompt_logits(model: torch.nn.Module) -> torch.Tensor:
    return PagedRunner(model, block_size=16).step({"s": list(range(3, 40))})["s"]


def test_sharded_checkpoint_loads_the_same_logits_as_a_single_file() -> None:
    single = tiny_checkpoint("qwen2")
    sharded = tiny_checkpoint("qwen2", max_shard_size="30KB")
    shards = set(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) > 1
    torch.testing.assert_close(
        prompt_logits(load(sharded)),
        prompt_logits(load(single)),
        rtol=0,
        atol=0,
    )


def test_dummy_load_gives_checkpoint_shapes_and_finite_outputs() -> None:
    path = tiny_checkpoint("qwen3", tie_word_embeddings=True)
    model = load(path, load_format="dummy")
    real = load(path)
    shapes = {name: param.shape for name, param in real.named_parameters()}
    assert {name: param.shape for name, param in model.named_parameters()} == shapes
    assert torch.isfinite(prompt_logits(model)).all()


def test_dummy_weights_follow_the_seed() -> None:
    path = tiny_checkpoint("llama")
    first, again, other = (load(path, load_format="dummy", seed=s) for s in (1, 1, 2))
    weight = "model.layers.0.self_attn.qkv_proj.weight"
    assert torch.equal(first.get_parameter(weight), again.get_parameter(weight))
    assert not torch.equal(first.get_parameter(weight), other.get_parameter(weight))


def test_unsupported_architecture_error_names_the_supported_ones(tmp_path: Path) -> None:
    config = json.loads((tiny_checkpoint("llama") / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    supported = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"
    with pytest.raises(ValueError, match=f"GPT2LMHeadModel.*{supported}"):
        load(tmp_path)


def test_missing_tensor_error_names_it(tmp_path: Path) -> None:
    source = tiny_checkpoint("llama")
    (tmp_path / "config.json").write_bytes((source / "config.json").read_bytes())
    tensors = load_file(source / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"], tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="lacks 2 weights") as error:
        load(tmp_path)
    assert "model.layers.1.mlp.down_proj.weight" in str(error.value)
    assert "model.layers.0.self_attn.k_proj.weight" in str(error.value)


def test_tensor_of_wrong_shape_error_names_it(tmp_path: Path) -> None:
    source = tiny_checkpoint("llama")
    (tmp_path / "config.json").write_bytes((source / "config.json").read_bytes())
    tensors = load_file(source / "model.safetensors")
    tensors["model.layers.0.self_attn.v_proj.weight"] = tensors["model.layers.0.self_attn.v_proj.weight"][:-1]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.v_proj\.weight: .*shape"):
        load(tmp_path)

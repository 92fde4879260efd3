"""Specification of the tiny random checkpoints the test suite and the demo server are built on."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from loomserve.testing import checkpoints as tc
from loomserve.testing.checkpoints import FAMILIES, build_tiny_checkpoint, tiny_checkpoint

NON_ASCII = "Un café naïve au Zürich, 日本語のテキスト, ¿qué? 😀🚀 ❤️ — done."

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Bonjour, café?"},
    {"role": "assistant", "content": "Oui."},
    {"role": "user", "content": "日本語?"},
]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: build_tiny_checkpoint(root / family, family) for family in FAMILIES}


@pytest.mark.parametrize(
    "family, architecture",
    [
        ("llama", "LlamaForCausalLM"),
        ("mistral", "MistralForCausalLM"),
        ("qwen2", "Qwen2ForCausalLM"),
        ("qwen3", "Qwen3ForCausalLM"),
    ],
)
def test_each_family_loads_in_transformers_with_its_architecture(built, family, architecture):
    model = AutoModelForCausalLM.from_pretrained(built[family])
    tokenizer = AutoTokenizer.from_pretrained(built[family])
    assert type(model).__name__ == architecture
    assert model.config.architectures == [architecture]
    assert model.dtype == torch.float32
    assert model.config.vocab_size >= len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert getattr(model.config, "sliding_window", None) is None


def test_qwen2_has_random_qkv_biases(built):
    model = AutoModelForCausalLM.from_pretrained(built["qwen2"])
    attn = model.model.layers[0].self_attn
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.bias is not None and proj.bias.abs().max() > 0.01
    assert attn.o_proj.bias is None


def test_qwen3_has_qk_norms_with_random_gains(built):
    model = AutoModelForCausalLM.from_pretrained(built["qwen3"])
    attn = model.model.layers[0].self_attn
    assert attn.q_norm.weight.shape == (model.config.head_dim,)
    assert not torch.allclose(attn.q_norm.weight, torch.ones_like(attn.q_norm.weight))
    assert attn.q_proj.bias is None


def test_llama_and_mistral_have_no_biases(built):
    for family in ("llama", "mistral"):
        assert not any(name.endswith(".bias") for name in _weights(built[family]))


def test_tied_embeddings_save_no_lm_head_and_load_tied(tmp_path):
    path = build_tiny_checkpoint(tmp_path, "qwen2", tie_word_embeddings=True)
    assert "lm_head.weight" not in _weights(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_shape_arguments_reach_the_config(tmp_path):
    rope = {"rope_type": "default", "rope_theta": 500000.0}
    path = build_tiny_checkpoint(
        tmp_path, "llama", hidden_size=96, num_layers=3, num_heads=6, num_kv_heads=3, head_dim=32,
        intermediate_size=160, max_position_embeddings=512, rope_parameters=rope,
    )
    config = AutoConfig.from_pretrained(path)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (96, 3, 6)
    assert (config.num_key_value_heads, config.head_dim, config.intermediate_size) == (3, 32, 160)
    assert config.max_position_embeddings == 512
    assert config.rope_parameters["rope_theta"] == 500000.0
    assert _weights(path)["model.layers.0.self_attn.q_proj.weight"].shape == (6 * 32, 96)


def test_same_seed_gives_identical_weights(tmp_path):
    a = _weights(build_tiny_checkpoint(tmp_path / "a", "qwen3", seed=7))
    b = _weights(build_tiny_checkpoint(tmp_path / "b", "qwen3", seed=7))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_different_seed_gives_different_weights(tmp_path):
    a = _weights(build_tiny_checkpoint(tmp_path / "a", "qwen3", seed=7))
    b = _weights(build_tiny_checkpoint(tmp_path / "b", "qwen3", seed=8))
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert not torch.equal(a["model.layers.1.mlp.down_proj.weight"], b["model.layers.1.mlp.down_proj.weight"])


def test_sharded_build_writes_an_index_and_loads_the_same_model(tmp_path, built):
    path = build_tiny_checkpoint(tmp_path, "qwen2", max_shard_size="100KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((path / shard).is_file() for shard in shards)
    assert not (path / "model.safetensors").exists()
    sharded = AutoModelForCausalLM.from_pretrained(path)
    single = AutoModelForCausalLM.from_pretrained(built["qwen2"])
    ids = torch.tensor([[5, 17, 300, 42]])
    assert torch.equal(sharded(ids).logits, single(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_round_trips_corpus_and_non_ascii_text(built, family):
    tokenizer = AutoTokenizer.from_pretrained(built[family])
    for text in (*tc.CORPUS, NON_ASCII, "unseen: ŝ ǅ ꙮ 𝔘 🦜🦩"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text


def test_tokenizer_splits_some_characters_across_tokens(built):
    tokenizer = AutoTokenizer.from_pretrained(built["qwen2"])
    ids = tokenizer.encode("🦜", add_special_tokens=False)
    assert len(ids) > 1  # a rare emoji is several byte-level tokens
    assert "\ufffd" in tokenizer.decode(ids[:1])  # a prefix decodes to an incomplete character


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_vocabulary_is_a_few_hundred_tokens(built, family):
    assert 500 <= len(AutoTokenizer.from_pretrained(built[family])) <= 1000


def test_tokenizer_is_deterministic(tmp_path):
    a = build_tiny_checkpoint(tmp_path / "a", "llama", seed=1)
    b = build_tiny_checkpoint(tmp_path / "b", "llama", seed=2)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_special_tokens_and_chatml_template(built, family):
    tokenizer = AutoTokenizer.from_pretrained(built[family])
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    assert tokenizer.encode("hi") == tokenizer.encode("hi", add_special_tokens=False)  # no BOS
    assert len(tokenizer.encode("<|im_start|>", add_special_tokens=False)) == 1
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nBonjour, café?<|im_end|>\n"
        "<|im_start|>assistant\nOui.<|im_end|>\n<|im_start|>user\n日本語?<|im_end|>\n<|im_start|>assistant\n"
    )
    without = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=False)
    assert text == without + "<|im_start|>assistant\n"


def test_llama_adds_bos_and_uses_zephyr_style_template(built):
    tokenizer = AutoTokenizer.from_pretrained(built["llama"])
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")
    assert tokenizer.encode("hi")[0] == tokenizer.bos_token_id
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<s><|system|>\nYou are terse.</s>\n<|user|>\nBonjour, café?</s>\n<|assistant|>\nOui.</s>\n"
        "<|user|>\n日本語?</s>\n<|assistant|>\n"
    )


def test_mistral_adds_bos_and_uses_inst_template(built):
    tokenizer = AutoTokenizer.from_pretrained(built["mistral"])
    assert tokenizer.encode("hi")[0] == tokenizer.bos_token_id
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == "<s>[INST] You are terse.\n\nBonjour, café? [/INST] Oui.</s>[INST] 日本語? [/INST]"


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_tokenizes_with_one_bos_and_accepts_content_parts(built, family):
    tokenizer = AutoTokenizer.from_pretrained(built[family])
    content = [{"type": "text", "text": "Bonjour, "}, {"type": "text", "text": "café?"}]
    parts = [{"role": "user", "content": content}]
    plain = [{"role": "user", "content": "Bonjour, café?"}]
    rendered = tokenizer.apply_chat_template(parts, tokenize=False, add_generation_prompt=True)
    assert rendered == tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.apply_chat_template(plain, add_generation_prompt=True)["input_ids"]
    assert ids == tokenizer.encode(rendered, add_special_tokens=False)
    if tokenizer.bos_token_id is not None:
        assert ids.count(tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_config_carries_the_special_token_ids(built, family):
    generation = json.loads((built[family] / "generation_config.json").read_text())
    config = AutoConfig.from_pretrained(built[family])
    assert generation["eos_token_id"] == config.eos_token_id
    assert generation["bos_token_id"] == config.bos_token_id


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_decoding_has_well_separated_logits_and_varied_output(built, family):
    model = AutoModelForCausalLM.from_pretrained(built[family]).eval()
    tokenizer = AutoTokenizer.from_pretrained(built[family])
    gaps = []
    for prompt in ("Hello, my name is", "def add(a, b):", "日本語のテキスト"):
        inputs = tokenizer(prompt, return_tensors="pt")
        out = model.generate(
            **inputs, max_new_tokens=30, min_new_tokens=30, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )
        for logits in out.logits:
            top2 = logits[0].topk(2).values
            gaps.append((top2[0] - top2[1]).item())
        generated = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        assert len(set(generated)) >= 10
    assert torch.tensor(gaps).median() > 0.1


def test_tiny_checkpoint_builds_once_and_reuses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOMSERVE_CACHE_DIR", str(tmp_path))
    calls = []
    real_build = tc.build_tiny_checkpoint
    monkeypatch.setattr(tc, "build_tiny_checkpoint", lambda *a, **k: calls.append(a) or real_build(*a, **k))
    first = tiny_checkpoint("qwen3", num_layers=1)
    second = tiny_checkpoint("qwen3", num_layers=1)
    assert first == second and len(calls) == 1
    assert first.parent.parent == tmp_path
    assert (first / "config.json").is_file()
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp folders left behind


def test_cache_key_applies_defaults_and_distinguishes_arguments(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOMSERVE_CACHE_DIR", str(tmp_path))
    default = tiny_checkpoint("llama", num_layers=1)
    assert tiny_checkpoint("llama", num_layers=1, seed=0) == default
    assert tiny_checkpoint("llama", num_layers=1, seed=1) != default
    assert tiny_checkpoint("mistral", num_layers=1) != default


def test_tiny_checkpoint_rejects_unknown_families_and_arguments(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOMSERVE_CACHE_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="unknown family"):
        tiny_checkpoint("gpt2")
    with pytest.raises(TypeError):
        tiny_checkpoint("llama", hidden=32)


def test_losing_a_build_race_uses_the_winners_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOMSERVE_CACHE_DIR", str(tmp_path))
    real_build = tc.build_tiny_checkpoint
    winner: list[Path] = []

    def build_while_another_process_finishes_first(path, family, **kwargs):
        real_build(path, family, **kwargs)
        target = Path(path).parent / Path(path).name[len(".tmp-"):].rsplit("-", 1)[0]
        winner.append(real_build(target, family, **kwargs))
        (target / "winner").touch()

    monkeypatch.setattr(tc, "build_tiny_checkpoint", build_while_another_process_finishes_first)
    path = tiny_checkpoint("qwen2", num_layers=1)
    assert [path] == winner and (path / "winner").exists()
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_concurrent_callers_get_one_complete_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOMSERVE_CACHE_DIR", str(tmp_path))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(tiny_checkpoint("mistral", num_layers=1)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and len(set(results)) == 1
    assert [p.name for p in results[0].parent.iterdir()] == [results[0].name]
    AutoModelForCausalLM.from_pretrained(results[0])

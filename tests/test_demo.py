"""The embedded default `loomserve serve` builds when it is given no MODEL."""

from __future__ import annotations

from transformers import AutoConfig, AutoTokenizer

from loomserve.demo import demo_checkpoint


def test_demo_checkpoint_is_a_bigger_cached_qwen2(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOMSERVE_CACHE_DIR", str(tmp_path))
    path = demo_checkpoint()
    assert demo_checkpoint() == path
    config = AutoConfig.from_pretrained(path)
    assert config.architectures == ["Qwen2ForCausalLM"]
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (256, 4, 8)
    assert (config.num_key_value_heads, config.max_position_embeddings) == (2, 4096)
    AutoTokenizer.from_pretrained(path).apply_chat_template([{"role": "user", "content": "Hi?"}], tokenize=False)

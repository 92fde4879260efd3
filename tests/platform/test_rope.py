"""RoPE: our cos/sin tables and rotation equal transformers' for every supported rope type."""

from __future__ import annotations

import pytest
import torch
from paged_batch import PagedRunner, load
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from loomserve.platform.models.rope import RotaryEmbedding, apply_rotary
from loomserve.testing.checkpoints import tiny_checkpoint

MAX_POSITIONS = 256
ROPE_PARAMETERS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    # original context 64: wavelengths below 16 kept, above 64 divided by 8, between interpolated
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
    },
}


def llama_config(rope_parameters: dict) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters=dict(rope_parameters),
    )


def ours_cos_sin(config: LlamaConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Our table as transformers lays it out: [P, head_dim], each half repeated."""
    rope = RotaryEmbedding(config, head_dim=16, max_positions=MAX_POSITIONS)
    cos, sin = rope(torch.arange(MAX_POSITIONS)).chunk(2, dim=-1)
    return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)


@pytest.mark.parametrize("rope_type", ROPE_PARAMETERS)
def test_cos_sin_equal_transformers_rotary_embedding(rope_type: str) -> None:
    config = llama_config(ROPE_PARAMETERS[rope_type])
    x = torch.zeros(1, dtype=torch.float32)
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(x, torch.arange(MAX_POSITIONS)[None])  # [1, P, D]
    cos, sin = ours_cos_sin(config)
    torch.testing.assert_close(cos, hf_cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, hf_sin[0], rtol=0, atol=1e-6)


def test_rotation_equals_transformers_apply_rotary_pos_emb() -> None:
    config = llama_config(ROPE_PARAMETERS["yarn"])
    positions = torch.tensor([0, 5, 63, 64, 200])
    q, k = torch.randn(5, 4, 16), torch.randn(5, 2, 16)  # [T, H, D]
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(q, positions[None])  # [1, T, D]
    hf_q, hf_k = apply_rotary_pos_emb(q, k, hf_cos[0], hf_sin[0], unsqueeze_dim=1)
    cos_sin = RotaryEmbedding(config, head_dim=16, max_positions=MAX_POSITIONS)(positions)
    torch.testing.assert_close(apply_rotary(q, cos_sin), hf_q, rtol=0, atol=1e-6)
    torch.testing.assert_close(apply_rotary(k, cos_sin), hf_k, rtol=0, atol=1e-6)


def test_partial_rotary_factor_rotates_only_the_leading_dims() -> None:
    config = llama_config({"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    rope = RotaryEmbedding(config, head_dim=16, max_positions=MAX_POSITIONS)
    full = RotaryEmbedding(llama_config(ROPE_PARAMETERS["default"]), head_dim=8, max_positions=MAX_POSITIONS)
    positions = torch.tensor([3, 100])
    x = torch.randn(2, 4, 16)
    out = apply_rotary(x, rope(positions))
    assert rope.rotary_dim == 8
    torch.testing.assert_close(out[..., :8], apply_rotary(x[..., :8], full(positions)), rtol=0, atol=0)
    assert torch.equal(out[..., 8:], x[..., 8:])


def test_unsupported_rope_type_names_the_supported_ones() -> None:
    config = llama_config(ROPE_PARAMETERS["default"])
    config.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="default, linear, dynamic, llama3, yarn"):
        RotaryEmbedding(config, head_dim=16, max_positions=MAX_POSITIONS)


@pytest.mark.parametrize("rope_type", ROPE_PARAMETERS)
def test_model_with_rope_type_matches_transformers_logits(rope_type: str) -> None:
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoint("llama", rope_parameters=ROPE_PARAMETERS[rope_type], max_position_embeddings=256)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    ours = load(path)
    tokens = torch.randint(reference.config.vocab_size, (150,), generator=torch.Generator().manual_seed(0))
    logits = PagedRunner(ours, block_size=16).step({"s": tokens.tolist()})["s"]
    with torch.inference_mode():
        expected = reference(tokens[None]).logits[0]
    assert ((logits - expected).abs().max() / expected.abs().max()).item() < 1e-5

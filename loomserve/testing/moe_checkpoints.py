"""Seeded tiny mixture-of-experts checkpoints in real Hugging Face format: Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE.

Built with transformers' own config and model classes and saved by `save_pretrained`, so the weights on disk carry
the per-expert names real checkpoints have. The tokenizer is the text families' (`checkpoints.py`): ChatML for the
Qwen families, Mistral's for Mixtral, Llama's for OLMoE. Eight experts, two per token; the Qwen3-MoE checkpoint
keeps its first layer dense (`mlp_only_layers`), the Qwen2-MoE one has a shared expert, the OLMoE one clips q/k/v.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from loomserve.testing.cache import cached_build
from loomserve.testing.checkpoints import (
    INIT_STD,
    build_key,
    build_tokenizer,
    save_random_model,
    special_token_ids,
)

MOE_FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")

FORMAT_VERSION = 1  # bump whenever the bytes a build writes change

_TOKENIZER_FAMILY = {"qwen3_moe": "qwen2", "qwen2_moe": "qwen2", "mixtral": "mistral", "olmoe": "llama"}


def _make_config(family: str, common: dict[str, Any], num_experts: int, top_k: int, expert_size: int) -> Any:
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    rope = {"rope_type": "default", "rope_theta": 1000000.0}
    if family == "qwen3_moe":
        return Qwen3MoeConfig(num_experts=num_experts, num_experts_per_tok=top_k, moe_intermediate_size=expert_size,
                              norm_topk_prob=True, mlp_only_layers=[0], use_sliding_window=False,
                              sliding_window=None, architectures=["Qwen3MoeForCausalLM"], rope_parameters=rope,
                              **common)
    if family == "qwen2_moe":
        return Qwen2MoeConfig(num_experts=num_experts, num_experts_per_tok=top_k, moe_intermediate_size=expert_size,
                              shared_expert_intermediate_size=2 * expert_size, norm_topk_prob=False,
                              use_sliding_window=False, architectures=["Qwen2MoeForCausalLM"], rope_parameters=rope,
                              **common)
    if family == "mixtral":
        common = {**common, "intermediate_size": expert_size}
        return MixtralConfig(num_local_experts=num_experts, num_experts_per_tok=top_k, sliding_window=None,
                             architectures=["MixtralForCausalLM"], rope_parameters=rope, **common)
    common = {**common, "intermediate_size": expert_size}
    return OlmoeConfig(num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=False, clip_qkv=4.0,
                       architectures=["OlmoeForCausalLM"], rope_parameters={"rope_type": "default",
                                                                            "rope_theta": 10000.0}, **common)


def build_tiny_moe_checkpoint(
    path: str | Path,
    family: str,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    num_experts: int = 8,
    top_k: int = 2,
    expert_size: int = 32,
    max_position_embeddings: int = 1024,
) -> Path:
    """Writes config.json, model.safetensors (per-expert names), generation_config.json and the tokenizer files."""
    if family not in MOE_FAMILIES:
        raise ValueError(f"unknown MoE family {family!r}; expected one of {MOE_FAMILIES}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(_TOKENIZER_FAMILY[family], model_max_length=max_position_embeddings)
    bos_id, eos_id, pad_id = special_token_ids(tokenizer, _TOKENIZER_FAMILY[family])
    common = {
        "vocab_size": len(tokenizer), "hidden_size": hidden_size, "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads, "intermediate_size": 2 * expert_size,
        "max_position_embeddings": max_position_embeddings, "tie_word_embeddings": False, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "initializer_range": INIT_STD, "bos_token_id": bos_id, "eos_token_id": eos_id,
        "pad_token_id": pad_id, "dtype": "float32", "use_cache": True,
    }
    return save_random_model(path, _make_config(family, common, num_experts, top_k, expert_size), tokenizer, seed)


_BUILD_SIGNATURE = inspect.signature(build_tiny_moe_checkpoint)


def tiny_moe_checkpoint(family: str, **kwargs: Any) -> Path:
    """Builds once into the cache folder (`cached_build`), keyed by family, kwargs and FORMAT_VERSION."""
    key = build_key(_BUILD_SIGNATURE, family, kwargs, FORMAT_VERSION)
    return cached_build(family, key, lambda path: build_tiny_moe_checkpoint(path, family, **kwargs))

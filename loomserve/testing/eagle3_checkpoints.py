"""Seeded tiny EAGLE-3 heads in the published layout, beside a tiny target checkpoint (no model hub).

A head folder holds the EAGLE repo's `config.json` (`LlamaForCausalLMEagle3`, one layer, `draft_vocab_size`, the
target layers it reads in `eagle_config`) and `model.safetensors` with its tensors under their published names:
`midlayer.*` (q/k/v read 2 * hidden inputs), `fc.weight` [hidden, 3 * target hidden], `norm.weight`,
`lm_head.weight` [draft vocab, hidden], `d2t` (draft id -> target id offset), `t2d` (target ids in the draft
vocabulary) and, only when asked for, `embed_tokens.weight` (published heads share the target's).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from loomserve.testing.cache import cached_build
from loomserve.testing.checkpoints import INIT_STD
from loomserve.testing.weights import NORM_JITTER

FORMAT_VERSION = 1


def head_config(target: Any, draft_vocab_size: int, aux_layer_ids: list[int] | None, num_heads: int,
                num_kv_heads: int, intermediate_size: int) -> Any:
    """The head's LlamaConfig for a target's text config."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=target.vocab_size, hidden_size=target.hidden_size, num_hidden_layers=1,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=target.hidden_size // num_heads,
        intermediate_size=intermediate_size, max_position_embeddings=target.max_position_embeddings,
        rms_norm_eps=target.rms_norm_eps, rope_parameters=dict(target.rope_parameters), hidden_act="silu",
        tie_word_embeddings=False, architectures=["LlamaForCausalLMEagle3"], dtype="float32",
    )
    config.draft_vocab_size = draft_vocab_size
    if aux_layer_ids is not None:
        config.eagle_config = {"eagle_aux_hidden_state_layer_ids": list(aux_layer_ids), "use_aux_hidden_state": True}
    return config


def head_tensors(config: Any, seed: int, own_embeddings: bool, draft_token_ids: list[int] | None) -> dict[str, Any]:
    """Seeded random tensors under the published names: matrices ~ N(0, INIT_STD), norm gains ~ 1 + N(0, jitter);
    the draft vocabulary `draft_token_ids` (sorted), else a seeded choice of target ids."""
    import torch

    hidden, vocab, draft_vocab = config.hidden_size, config.vocab_size, config.draft_vocab_size
    q_size, kv_size = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    shapes = {
        "fc.weight": (hidden, 3 * hidden),
        "lm_head.weight": (draft_vocab, hidden),
        "norm.weight": (hidden,),
        "midlayer.self_attn.q_proj.weight": (q_size, 2 * hidden),
        "midlayer.self_attn.k_proj.weight": (kv_size, 2 * hidden),
        "midlayer.self_attn.v_proj.weight": (kv_size, 2 * hidden),
        "midlayer.self_attn.o_proj.weight": (hidden, q_size),
        "midlayer.mlp.gate_proj.weight": (config.intermediate_size, hidden),
        "midlayer.mlp.up_proj.weight": (config.intermediate_size, hidden),
        "midlayer.mlp.down_proj.weight": (hidden, config.intermediate_size),
        "midlayer.input_layernorm.weight": (hidden,),
        "midlayer.hidden_norm.weight": (hidden,),
        "midlayer.post_attention_layernorm.weight": (hidden,),
    }
    if own_embeddings:
        shapes["embed_tokens.weight"] = (vocab, hidden)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in sorted(shapes.items()):
        values = torch.randn(shape, generator=gen)
        tensors[name] = 1.0 + NORM_JITTER * values if name.endswith("norm.weight") else INIT_STD * values
    chosen = torch.randperm(vocab, generator=gen)[:draft_vocab] if draft_token_ids is None else torch.tensor(
        draft_token_ids)
    target_ids = chosen.sort().values  # [draft vocab]
    tensors["d2t"] = target_ids - torch.arange(draft_vocab)
    tensors["t2d"] = torch.zeros(vocab, dtype=torch.bool).index_fill_(0, target_ids, True)
    return tensors


def build_eagle3_head(
    path: str | Path,
    target: str | Path,
    *,
    seed: int = 0,
    draft_vocab_size: int | None = None,
    draft_token_ids: list[int] | None = None,
    aux_layer_ids: list[int] | None = None,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    own_embeddings: bool = False,
    with_weights: bool = True,
) -> Path:
    """Writes the head's config.json and (unless `with_weights` is off: a head for dummy-weight targets)
    model.safetensors into `path`, for the target checkpoint folder `target`. The draft vocabulary is
    `draft_token_ids` (as EAGLE-3 takes the tokens its target emits most), else `draft_vocab_size` seeded target ids
    (default: half the target's vocabulary)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    target_config = AutoConfig.from_pretrained(target).get_text_config()
    if draft_token_ids is not None:
        draft_vocab_size = len(set(draft_token_ids))
    config = head_config(target_config, draft_vocab_size or target_config.vocab_size // 2, aux_layer_ids,
                         num_heads, num_kv_heads, intermediate_size)
    config.save_pretrained(path)
    if with_weights:
        ids = None if draft_token_ids is None else sorted(set(draft_token_ids))
        save_file(head_tensors(config, seed, own_embeddings, ids), path / "model.safetensors")
    return path


_BUILD_SIGNATURE = inspect.signature(build_eagle3_head)


def tiny_eagle3_head(target: str | Path, **kwargs: Any) -> Path:
    """Builds once into the cache folder (`cached_build`), keyed by the target folder, kwargs and FORMAT_VERSION."""
    bound = _BUILD_SIGNATURE.bind("<path>", str(target), **kwargs)
    bound.apply_defaults()
    key = {"format_version": FORMAT_VERSION, "args": {k: v for k, v in bound.arguments.items() if k != "path"}}
    return cached_build("eagle3", key, lambda path: build_eagle3_head(path, target, **kwargs))

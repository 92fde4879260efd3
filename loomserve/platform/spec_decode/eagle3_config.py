"""An EAGLE-3 head's config read and checked against its target, before any weight loads.

The head says which target layers feed it in `eagle_aux_hidden_state_layer_ids` (top level, or inside
`eagle_config`), counted as vLLM does: id i is the input of the target's layer i (0: the embeddings). Without them
it takes vLLM's default choice, low / middle / high: (2, layers // 2, layers - 3).
"""

from __future__ import annotations

from typing import Any

ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")


def head_config(path: str) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def _eagle_config(config: Any) -> dict[str, Any]:
    extra = getattr(config, "eagle_config", None)
    return extra if isinstance(extra, dict) else {}


def default_aux_layer_ids(num_target_layers: int) -> tuple[int, ...]:
    return 2, num_target_layers // 2, num_target_layers - 3


def aux_layer_ids(config: Any, num_target_layers: int) -> tuple[int, ...]:
    ids = getattr(config, "eagle_aux_hidden_state_layer_ids", None) or _eagle_config(config).get(
        "eagle_aux_hidden_state_layer_ids")
    return tuple(ids) if ids else default_aux_layer_ids(num_target_layers)


def target_hidden_size(config: Any) -> int:
    """The hidden size of the target this head was trained on (its own unless `target_hidden_size` says)."""
    return getattr(config, "target_hidden_size", None) or config.hidden_size


def check_head(path: str, config: Any, target: Any) -> None:
    """Refuse a head that is not an EAGLE-3 head of this layout or does not fit the target's text config."""
    architectures = tuple(getattr(config, "architectures", None) or ())
    if not set(architectures) & set(ARCHITECTURES) or config.model_type != "llama":
        raise ValueError(f"{path} is not an EAGLE-3 head (architectures {list(architectures)}, model_type "
                         f"{config.model_type!r}); expected a llama-type {' or '.join(ARCHITECTURES)}")
    if config.num_hidden_layers != 1:
        raise ValueError(f"the EAGLE-3 head {path} has {config.num_hidden_layers} layers; only one-layer heads (the "
                         "published layout) are supported")
    if _eagle_config(config).get("use_aux_hidden_state") is False:
        raise ValueError(f"the EAGLE-3 head {path} reads no auxiliary hidden states (use_aux_hidden_state false); "
                         "only heads fed by the target's layers are supported")
    if config.vocab_size != target.vocab_size:
        raise ValueError(f"the EAGLE-3 head {path} has a vocabulary of {config.vocab_size} tokens, the target "
                         f"{target.vocab_size}: a head must be trained for the target's tokenizer")
    draft_vocab = getattr(config, "draft_vocab_size", None) or config.vocab_size
    if not 0 < draft_vocab <= config.vocab_size:
        raise ValueError(f"the EAGLE-3 head {path} has draft_vocab_size {draft_vocab}, outside 1..{config.vocab_size}")
    if target_hidden_size(config) != target.hidden_size:
        raise ValueError(f"the EAGLE-3 head {path} reads hidden states of size {target_hidden_size(config)}, the "
                         f"target's are {target.hidden_size}: a head must be trained for its target")
    num_layers = target.num_hidden_layers
    ids = aux_layer_ids(config, num_layers)
    if len(ids) != 3 or not all(0 <= i < num_layers for i in ids):
        raise ValueError(f"the EAGLE-3 head {path} reads target layers {list(ids)}, but needs three of the target's "
                         f"{num_layers} layers (0..{num_layers - 1}): set eagle_aux_hidden_state_layer_ids in its "
                         "config.json")

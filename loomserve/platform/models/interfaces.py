"""What a model class can do, stated as class flags on `ServedModel`, the base of every model the registry serves.

The engine reads these flags instead of probing for attributes: the runner builds a multimodal runner and a KV
cache from them, CUDA graphs size their position buffers, poolers find a classifier head, LoRA and NF4 find the
layers they touch. Every model family states each flag in its own class body (tests/platform/test_registry.py
checks), so a new family cannot inherit a capability by accident. The base's values describe a plain module
that can do none of these things.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn


class ServedModel(nn.Module):
    """A model the engine serves: `forward` over packed tokens, `load_weights` from HF-named tensors."""

    # Takes media: has `encode` and `embed_input_ids`, and the registry names its processor.
    is_multimodal: ClassVar[bool] = False
    # Has decoder layers whose linears LoRA adapts (`packing.decoder_linears`).
    supports_lora: ClassVar[bool] = False
    # The pooling tasks it serves ("embed", "classify"); empty: it generates through `compute_logits`.
    pooling_tasks: ClassVar[tuple[str, ...]] = ()
    # Bidirectional attention over each whole prompt: it keeps no KV cache.
    encoder_only: ClassVar[bool] = False
    # Multimodal RoPE: positions are [3, T] (temporal, height, width) instead of [T].
    uses_mrope: ClassVar[bool] = False
    # Mixture-of-experts layers (expert parallelism, fused expert weights).
    is_moe: ClassVar[bool] = False
    # An encoder run once per request and a decoder cross-attending to it (Whisper): has `encode` and `cross_kv`.
    is_encoder_decoder: ClassVar[bool] = False

    # checkpoint projection -> (fused parameter module, shard index); empty: nothing fused.
    packed_modules_mapping: ClassVar[dict[str, tuple[str, int]]] = {}
    # Name prefix of the language model's modules: LoRA and NF4 touch those only ("": the whole model).
    language_model_prefix: ClassVar[str] = ""

    def canonical_name(self, name: str) -> str:
        """A checkpoint (or adapter) module name -> this model's module name; models whose checkpoints come in
        several layouts override it."""
        return name


def is_multimodal(model: ServedModel | type[ServedModel]) -> bool:
    return model.is_multimodal


def supports_lora(model: ServedModel | type[ServedModel]) -> bool:
    return model.supports_lora


def is_pooling(model: ServedModel | type[ServedModel]) -> bool:
    """Serves embeddings or classifications from hidden states; has no LM head."""
    return bool(model.pooling_tasks)


def supports_classify(model: ServedModel | type[ServedModel]) -> bool:
    """Has a classification head: `classify(pooled [B, hidden]) -> [B, num_labels]`."""
    return "classify" in model.pooling_tasks


def is_encoder_only(model: ServedModel | type[ServedModel]) -> bool:
    return model.encoder_only


def uses_mrope(model: ServedModel | type[ServedModel]) -> bool:
    return model.uses_mrope


def is_moe(model: ServedModel | type[ServedModel]) -> bool:
    return model.is_moe


def is_encoder_decoder(model: ServedModel | type[ServedModel]) -> bool:
    return model.is_encoder_decoder

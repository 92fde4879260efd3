"""The one model registry: every architecture resolves to a class whose flags agree with its entry."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from loomserve.platform.models import interfaces
from loomserve.platform.models.decoder import DecoderSpec, decoder_spec
from loomserve.platform.models.interfaces import ServedModel
from loomserve.platform.models.registry import (
    SUPPORTED_ARCHITECTURES,
    TASKS,
    architecture_tasks,
    get_model_class,
    is_encoder_only,
    is_multimodal,
    model_entry,
    resolve_task,
)

MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM", "OlmoeForCausalLM")
FLAGS = ("is_multimodal", "supports_lora", "pooling_tasks", "encoder_only", "uses_mrope", "is_moe")


def _declared_flags(model_cls: type) -> set[str]:
    """The flags some class between `model_cls` and ServedModel states in its own body."""
    family = [c for c in model_cls.__mro__ if issubclass(c, ServedModel) and c is not ServedModel]
    return {flag for flag in FLAGS for c in family if flag in vars(c)}


@pytest.mark.parametrize("architecture", SUPPORTED_ARCHITECTURES)
def test_every_architecture_resolves_to_a_class_that_states_its_flags(architecture):
    tasks = architecture_tasks(architecture)
    assert tasks and set(tasks) <= set(TASKS)
    for task in tasks:
        model_cls = get_model_class(architecture, task)
        assert issubclass(model_cls, ServedModel)
        assert _declared_flags(model_cls) == set(FLAGS)
        if task == "generate":
            assert not interfaces.is_pooling(model_cls) and hasattr(model_cls, "compute_logits")
        else:
            assert task in model_cls.pooling_tasks
        assert interfaces.supports_classify(model_cls) == hasattr(model_cls, "classify")
        assert interfaces.is_moe(model_cls) == (architecture in MOE_ARCHITECTURES)


@pytest.mark.parametrize("architecture", SUPPORTED_ARCHITECTURES)
def test_registry_and_class_flags_agree(architecture):
    model_cls = get_model_class(architecture)
    assert is_encoder_only(architecture) == interfaces.is_encoder_only(model_cls)
    assert is_multimodal(architecture) == interfaces.is_multimodal(model_cls)
    # Encoders keep no KV cache and take no LoRA; only M-RoPE models of the multimodal kind exist.
    assert not (interfaces.is_encoder_only(model_cls) and interfaces.supports_lora(model_cls))
    assert not interfaces.uses_mrope(model_cls) or interfaces.is_multimodal(model_cls)
    if interfaces.is_multimodal(model_cls):
        assert model_cls.language_model_prefix and hasattr(model_cls, "encode")


def test_a_multimodal_architecture_names_an_importable_processor():
    multimodal = [a for a in SUPPORTED_ARCHITECTURES if is_multimodal(a)]
    assert "LlavaForConditionalGeneration" in multimodal and "Qwen2AudioForConditionalGeneration" in multimodal
    for architecture in multimodal:
        module, name = model_entry(architecture).processor.split(":")
        assert hasattr(__import__(module, fromlist=[name]), name)
    assert not is_multimodal("Qwen2ForCausalLM")


def test_an_unknown_architecture_is_refused_naming_the_supported_ones():
    with pytest.raises(ValueError, match="'GPT2LMHeadModel' is not supported; supported: LlamaForCausalLM, "):
        get_model_class("GPT2LMHeadModel")
    with pytest.raises(ValueError, match="Qwen2AudioForConditionalGeneration"):
        architecture_tasks("GPT2LMHeadModel")


def test_a_causal_lm_embeds_without_its_lm_head():
    assert get_model_class("Qwen3ForCausalLM", "embed").__name__ == "DecoderForEmbedding"
    assert resolve_task("Qwen3ForCausalLM") == "generate"
    assert resolve_task("Qwen3ForCausalLM", has_pooling=True) == "embed"
    assert resolve_task("BertForSequenceClassification", has_pooling=True) == "classify"
    with pytest.raises(ValueError, match="cannot serve the 'classify' task, only: generate, embed"):
        resolve_task("LlamaForCausalLM", "classify")
    with pytest.raises(ValueError, match="unknown task 'chat'"):
        resolve_task("LlamaForCausalLM", "chat")


def test_decoder_families_are_specs_and_an_unknown_family_is_refused():
    assert decoder_spec(SimpleNamespace(model_type="qwen2_5_vl_text")) == DecoderSpec(qkv_bias=True)
    assert decoder_spec(SimpleNamespace(model_type="qwen3")) == DecoderSpec(qk_norm=True)
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported; supported: llama"):
        decoder_spec(SimpleNamespace(model_type="gpt2"))


def test_reading_the_registry_imports_no_model_code():
    code = ("import sys; from loomserve.platform.models import registry; registry.architecture_tasks('BertModel'); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

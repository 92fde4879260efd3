"""LoRA over an FP8 KV cache: the adapted keys and values are what the cache rounds through float8, which is what
peft computes over transformers' model with its keys and values fake-quantized the same way."""

from __future__ import annotations

import pytest
import torch
from peft_reference import SHAPES
from test_qlora import engine_run, peft_reference

from loomserve import LLM, LoRARequest
from loomserve.testing.fp8_kv_reference import fake_quantized_attention

LOGPROB_TOLERANCE = 2e-4  # as over FP8 weights: a float sum in another order can cross a float8 rounding boundary


def test_lora_over_an_fp8_kv_cache_equals_peft_with_fake_quantized_kv(qwen2_checkpoint, make_lora) -> None:
    from transformers import AutoModelForCausalLM

    adapter = make_lora(qwen2_checkpoint, "all-r16", seed=2, **SHAPES["all-r16"])
    llm = LLM(qwen2_checkpoint, device="cpu", kv_cache_dtype="fp8", enable_lora=True, max_lora_rank=16,
              block_size=4, kv_cache_memory="32MiB")
    tokens, logprobs = engine_run(llm, LoRARequest("a", 1, adapter))
    attention = fake_quantized_attention(torch.float8_e4m3fn, lambda layer: (1.0, 1.0))  # no scales: 1.0
    model = AutoModelForCausalLM.from_pretrained(qwen2_checkpoint, dtype=torch.float32, attn_implementation=attention)
    ref_tokens, ref_logprobs = peft_reference(model, qwen2_checkpoint, adapter)
    assert tokens == ref_tokens
    for got, ref in zip(logprobs, ref_logprobs):
        assert got == pytest.approx(ref, abs=LOGPROB_TOLERANCE)

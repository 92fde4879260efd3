"""LoRA over an FP8 (compressed-tensors) base: the adapters add to the quantized linears' outputs, which is what
peft computes over transformers' model of the same checkpoint: the same greedy tokens, log-probabilities within
2e-4 (QLoRA's 5e-5 is for float sums in another order; here such a difference can also move an activation across
an FP8 rounding boundary)."""

from __future__ import annotations

import pytest
import torch
from peft_reference import SHAPES
from test_qlora import engine_run, peft_reference

from loomserve import LLM, LoRARequest
from loomserve.platform.quantization.w8a8 import W8Linear
from loomserve.testing.checkpoints import tiny_checkpoint
from loomserve.testing.quantized_checkpoints import SHAPE, tiny_compressed_tensors

pytest.importorskip("compressed_tensors")

LOGPROB_TOLERANCE = 2e-4


def test_lora_over_fp8_equals_peft_over_the_same_checkpoint(make_lora) -> None:
    from transformers import AutoModelForCausalLM

    base = str(tiny_compressed_tensors("FP8_DYNAMIC"))
    adapter = make_lora(str(tiny_checkpoint("llama", **SHAPE)), "all-r16", seed=3, **SHAPES["all-r16"])
    llm = LLM(base, enable_lora=True, max_lora_rank=16, block_size=4, kv_cache_memory="32MiB")
    qkv = llm.engine.executor.runner.model.model.layers[0].self_attn.qkv_proj.base_layer
    assert isinstance(qkv, W8Linear) and qkv.weight.dtype == torch.float8_e4m3fn
    tokens, logprobs = engine_run(llm, LoRARequest("a", 1, adapter))
    ref_tokens, ref_logprobs = peft_reference(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                              base, adapter)
    assert tokens == ref_tokens
    for got, ref in zip(logprobs, ref_logprobs):
        assert got == pytest.approx(ref, abs=LOGPROB_TOLERANCE)

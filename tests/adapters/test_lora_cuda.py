"""On CUDA, adapters served with the Triton kernels, in CUDA-graph decode steps and in eager ones, give peft's
greedy tokens (float32), with base requests and three adapters of different ranks in one batch."""

from __future__ import annotations

import pytest
import torch
from peft_reference import MAX_TOKENS, PROMPTS, SHAPES, peft_greedy

from loomserve import LLM, LoRARequest, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_mixed_adapters_on_cuda_equal_peft(qwen2_checkpoint, shaped_adapters, enforce_eager):
    adapters = shaped_adapters(qwen2_checkpoint)
    loras = [None] + [LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters.items())]
    llm = LLM(qwen2_checkpoint, device="cuda", dtype="float32", enable_lora=True, max_loras=len(SHAPES),
              max_lora_rank=16, kv_cache_memory="64MiB", enforce_eager=enforce_eager)
    runner = llm.engine.executor.runner
    assert llm.engine.executor.runner.hook("lora").manager.state.backend == "triton"
    assert (runner.cuda_graphs is None) == enforce_eager
    prompts = [p for p in PROMPTS for _ in loras]
    requests = [lora for _ in PROMPTS for lora in loras]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, lora_request=requests)]
    for i, lora in enumerate(requests):
        expected = peft_greedy(qwen2_checkpoint, None if lora is None else lora.lora_path)[i // len(loras)]
        assert got[i] == expected, (lora and lora.lora_name, PROMPTS[i // len(loras)])

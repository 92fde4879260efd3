"""Adapters under tensor parallelism: two gloo ranks, each holding its share of every adapter (B's rows on q/k/v and
gate/up, A's columns on o_proj and down_proj, whose LoRA term joins the all-reduce), decode what peft decodes on one
device (and so what one rank decodes), for adapters on every projection with per-module ranks and alphas, mixed
with base requests in one batch."""

from __future__ import annotations

from peft_reference import MAX_TOKENS, PROMPTS, peft_greedy

from loomserve import LLM, LoRARequest, SamplingParams
from loomserve.testing.int4_checkpoints import tiny_int4

GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def test_two_ranks_with_adapters_decode_what_peft_decodes(qwen2_checkpoint, shaped_adapters):
    adapters = shaped_adapters(qwen2_checkpoint)
    loras = [None, LoRARequest("all-r16", 1, adapters["all-r16"]), LoRARequest("rslora", 2, adapters["rslora"])]
    llm = LLM(qwen2_checkpoint, device="cpu", tensor_parallel_size=2, enable_lora=True, max_loras=2,
              max_lora_rank=16, block_size=4, kv_cache_memory="8MiB")
    try:
        prompts = [p for p in PROMPTS for _ in loras]  # every step holds tokens of the base and both adapters
        requests = [lora for _ in PROMPTS for lora in loras]
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, lora_request=requests)]
    finally:
        llm.engine.shutdown()
    for i, lora in enumerate(loras):
        expected = peft_greedy(qwen2_checkpoint, lora and lora.lora_path)
        assert got[i :: len(loras)] == expected, lora and lora.lora_name
    assert peft_greedy(qwen2_checkpoint, adapters["rslora"]) != peft_greedy(qwen2_checkpoint, None)


def test_two_ranks_with_adapters_over_int4_weights_decode_what_peft_decodes_over_those_weights(shaped_adapters):
    """QLoRA under tensor parallelism: adapters shard with their quantized base layers (GPTQ act-order, whose
    row-parallel slices hold rows of any group); peft runs the dense weights the checkpoint encodes."""
    quantized, dense = (str(path) for path in tiny_int4("gptq", 128, act_order=True))
    adapter = shaped_adapters(dense)["all-r16"]
    llm = LLM(quantized, device="cpu", tensor_parallel_size=2, enable_lora=True, max_loras=1, max_lora_rank=16,
              block_size=4, kv_cache_memory="8MiB")
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, LoRARequest("all-r16", 1, adapter))]
    finally:
        llm.engine.shutdown()
    assert got == peft_greedy(dense, adapter)
    assert got != peft_greedy(dense, None)  # the adapter changes the output

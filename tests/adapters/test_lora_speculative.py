"""Speculative decoding under adapters: the target applies each request's adapter to every verified position (the
draft model runs without one; an EAGLE-3 head reads the adapted target's hidden states), so greedy output equals the
same adapters without speculation."""

from __future__ import annotations

from loomserve import LLM, SamplingParams
from loomserve.adapters.request import LoRARequest
from loomserve.testing.eagle3_checkpoints import tiny_eagle3_head

PROMPTS = ["hello world hello world hello world hello", "1 2 3 1 2 3 1 2 3 1 2"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


def mixed_batch(base: str, loras: list[LoRARequest | None], **engine) -> list[list[int]]:
    """Every prompt under every adapter (and the base model), in one generate call."""
    llm = LLM(base, enable_lora=True, max_loras=2, max_lora_rank=16, block_size=4, kv_cache_memory="32MiB", **engine)
    prompts = [p for p in PROMPTS for _ in loras]
    requests = [lora for _ in PROMPTS for lora in loras]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, lora_request=requests)]


def test_speculation_under_adapters_equals_the_adapters_without_it(qwen2_checkpoint, shaped_adapters):
    adapters = shaped_adapters(qwen2_checkpoint)
    loras = [None, LoRARequest("a", 1, adapters["qv-r8"]), LoRARequest("b", 2, adapters["all-r16"])]
    expected = mixed_batch(qwen2_checkpoint, loras)
    assert len({tuple(ids) for ids in expected[: len(loras)]}) == len(loras)  # the adapters change the output
    assert mixed_batch(qwen2_checkpoint, loras, speculative_config=NGRAM) == expected
    draft = {"method": "draft_model", "model": qwen2_checkpoint, "num_speculative_tokens": 2}
    assert mixed_batch(qwen2_checkpoint, loras, speculative_config=draft) == expected
    emitted = sorted({t for ids in expected for t in ids})  # the head's draft vocabulary, so some drafts are right
    head = tiny_eagle3_head(qwen2_checkpoint, aux_layer_ids=[1, 0, 1], draft_token_ids=emitted)
    eagle3 = {"method": "eagle3", "model": str(head), "num_speculative_tokens": 2}
    assert mixed_batch(qwen2_checkpoint, loras, speculative_config=eagle3) == expected

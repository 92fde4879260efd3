"""Typed calls from the front end into the engine, each answered once done with its id and error (or None):
resetting the prefix cache drops the cached blocks, so the same prompt finds nothing cached afterwards; a call to a
feature the engine runs without is answered with why."""

from __future__ import annotations

from loomserve import LLM, LoRARequest, SamplingParams
from loomserve.platform.messages import AddLoRA, CallReply, ResetPrefixCache

PROMPT = "café naïve 日本語 and some more words so that this prompt crosses several blocks of the cache"
GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def test_reset_prefix_cache_call_drops_the_cached_blocks(qwen2_checkpoint):
    llm = LLM(qwen2_checkpoint, block_size=4, kv_cache_memory="32MiB")
    first = llm.generate(PROMPT, GREEDY)[0]
    assert llm.generate(PROMPT, GREEDY)[0].num_cached_tokens >= 16  # cached before the reset
    llm.engine.call(ResetPrefixCache(3))
    assert llm.engine.take_call_replies() == [CallReply(3, None)]
    again = llm.generate(PROMPT, GREEDY)[0]
    assert again.num_cached_tokens == 0 and again.outputs[0].token_ids == first.outputs[0].token_ids


def test_a_call_to_a_feature_that_is_off_is_answered_with_why(qwen2_checkpoint):
    llm = LLM(qwen2_checkpoint, block_size=4, kv_cache_memory="8MiB")
    llm.engine.call(AddLoRA(4, LoRARequest("sql", 1, "/adapters/sql")))
    assert llm.engine.take_call_replies() == [CallReply(4, "LoRA is not enabled: start the engine with "
                                                           "enable_lora=True (--enable-lora)")]

"""Calls from the front end into the engine ([method, call id, *args], answered [call id, error or None]):
resetting the prefix cache drops the cached blocks, so the same prompt finds nothing cached afterwards."""

from __future__ import annotations

from loomserve import LLM, SamplingParams

PROMPT = "café naïve 日本語 and some more words so that this prompt crosses several blocks of the cache"
GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def test_reset_prefix_cache_call_drops_the_cached_blocks(qwen2_checkpoint):
    llm = LLM(qwen2_checkpoint, block_size=4, kv_cache_memory="32MiB")
    first = llm.generate(PROMPT, GREEDY)[0]
    assert llm.generate(PROMPT, GREEDY)[0].num_cached_tokens >= 16  # cached before the reset
    llm.engine.call_utility(["reset_prefix_cache", 3])
    assert llm.engine.take_utility_replies() == [[3, None]]
    again = llm.generate(PROMPT, GREEDY)[0]
    assert again.num_cached_tokens == 0 and again.outputs[0].token_ids == first.outputs[0].token_ids


def test_an_unknown_call_is_answered_with_its_error(qwen2_checkpoint):
    llm = LLM(qwen2_checkpoint, block_size=4, kv_cache_memory="8MiB")
    llm.engine.call_utility(["no_such_call", 4])
    assert llm.engine.take_utility_replies() == [[4, "unknown engine call 'no_such_call'"]]

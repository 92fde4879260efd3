"""The engine's greedy decoding equals transformers' `generate`, token for token, for every family,
whatever the batch, the cache state, the token budget or the memory pressure."""

from __future__ import annotations

import functools

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loomserve import LLM, SamplingParams

PROMPTS = [
    "hello world",
    "the cat sat on the mat and then it",
    "a",
    "café naïve 日本語 and some more words so that this prompt crosses several blocks of the cache",
]
MAX_TOKENS = 20
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


@functools.cache
def reference(path: str) -> list[list[int]]:
    """transformers' greedy continuations of PROMPTS, one prompt at a time."""
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False)
        out.append(gen[0, ids.shape[1] :].tolist())
    return out


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_greedy_batch_equals_transformers(family_checkpoint):
    _, path = family_checkpoint
    llm = LLM(path, block_size=4, kv_cache_memory="32MiB")
    assert token_ids(llm.generate(PROMPTS, GREEDY)) == reference(path)


def test_greedy_without_prefix_caching_equals_transformers(family_checkpoint):
    _, path = family_checkpoint
    llm = LLM(path, block_size=4, kv_cache_memory="32MiB", enable_prefix_caching=False)
    assert token_ids(llm.generate(PROMPTS, GREEDY)) == reference(path)


def test_prefix_cache_hits_keep_output_equal(family_checkpoint):
    _, path = family_checkpoint
    llm = LLM(path, block_size=4, kv_cache_memory="32MiB")
    llm.generate(PROMPTS, GREEDY)
    again = llm.generate(PROMPTS, GREEDY)
    assert token_ids(again) == reference(path)
    assert again[3].num_cached_tokens >= 16  # the long prompt's full blocks were reused


def test_chunked_prefill_with_tiny_budget_equals_transformers(family_checkpoint):
    _, path = family_checkpoint
    llm = LLM(path, block_size=4, kv_cache_memory="32MiB", max_num_batched_tokens=6)
    assert token_ids(llm.generate(PROMPTS, GREEDY)) == reference(path)


def test_forced_preemption_resumes_with_unchanged_output(family_checkpoint):
    _, path = family_checkpoint
    # 24 blocks of 4 tokens: the four requests need ~40 blocks together, so some must be preempted.
    llm = LLM(path, block_size=4, num_gpu_blocks_override=24, max_model_len=96)
    outputs = llm.generate(PROMPTS, GREEDY)
    assert token_ids(outputs) == reference(path)
    assert llm.engine.scheduler.total_preemptions > 0
    assert llm.engine.scheduler.kv.pool.num_free_blocks == 24


def test_n_greater_than_one_greedy_children_all_equal_transformers(family_checkpoint):
    _, path = family_checkpoint
    llm = LLM(path, block_size=4, kv_cache_memory="32MiB")
    params = SamplingParams(n=3, temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params)
    for out, ref in zip(outputs, reference(path)):
        assert [c.token_ids for c in out.outputs] == [ref] * 3
        assert [c.index for c in out.outputs] == [0, 1, 2]


def test_async_scheduling_equals_transformers(family_checkpoint):
    _, path = family_checkpoint
    llm = LLM(path, block_size=4, kv_cache_memory="32MiB", async_scheduling=True)
    assert token_ids(llm.generate(PROMPTS, GREEDY)) == reference(path)


def test_async_scheduling_with_preemption_and_chunks_equals_transformers(family_checkpoint):
    _, path = family_checkpoint
    llm = LLM(path, block_size=4, num_gpu_blocks_override=24, max_model_len=96, max_num_batched_tokens=6,
              async_scheduling=True)
    assert token_ids(llm.generate(PROMPTS, GREEDY)) == reference(path)
    assert llm.engine.scheduler.total_preemptions > 0
    assert llm.engine.scheduler.kv.pool.num_free_blocks == 24

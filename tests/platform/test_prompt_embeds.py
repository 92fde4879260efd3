"""Prompt embeddings in place of token ids (LLM.generate({"prompt_embeds": tensor}), vLLM's EmbedsPrompt): the
engine puts the given rows where the token embedding lookup would, and keeps their prefix-cache blocks apart."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loomserve import LLM, SamplingParams

PROMPT = "the cat sat on the mat and then it jumped over the fence"
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def hf(qwen2_checkpoint):
    return AutoModelForCausalLM.from_pretrained(qwen2_checkpoint, dtype=torch.float32)


@pytest.fixture(scope="module")
def ids(qwen2_checkpoint) -> torch.Tensor:
    return AutoTokenizer.from_pretrained(qwen2_checkpoint)(PROMPT, return_tensors="pt").input_ids[0]  # [seq_len]


@pytest.fixture(scope="module")
def embeds(hf, ids) -> torch.Tensor:
    with torch.no_grad():
        return hf.get_input_embeddings()(ids)  # [seq_len, hidden]


@pytest.fixture(scope="module")
def llm(qwen2_checkpoint) -> LLM:
    return LLM(qwen2_checkpoint, block_size=4, kv_cache_memory="32MiB", enable_prompt_embeds=True,
               max_num_batched_tokens=8)  # prompts prefill in chunks


def generated(llm: LLM, prompt) -> list[int]:
    return llm.generate(prompt, GREEDY)[0].outputs[0].token_ids


def test_embeddings_of_the_tokens_generate_what_the_tokens_do(llm, ids, embeds):
    assert generated(llm, {"prompt_embeds": embeds}) == generated(llm, ids.tolist())


def test_greedy_from_embeddings_equals_transformers_inputs_embeds(llm, hf, embeds):
    reference = hf.generate(inputs_embeds=embeds[None], attention_mask=torch.ones(1, len(embeds), dtype=torch.long),
                            max_new_tokens=12, min_new_tokens=12, do_sample=False)[0].tolist()
    shifted = embeds + 0.05  # rows no token has: the model reads the given embeddings, not token ids
    reference_shifted = hf.generate(inputs_embeds=shifted[None], attention_mask=torch.ones(1, len(embeds)).long(),
                                    max_new_tokens=12, min_new_tokens=12, do_sample=False)[0].tolist()
    assert generated(llm, {"prompt_embeds": embeds}) == reference
    assert generated(llm, {"prompt_embeds": shifted}) == reference_shifted


def test_prefix_cache_reuses_equal_embeddings_only(llm, embeds):
    llm.generate({"prompt_embeds": embeds}, GREEDY)
    again = llm.generate({"prompt_embeds": embeds.clone()}, GREEDY)[0]
    other = llm.generate({"prompt_embeds": embeds * 1.5}, GREEDY)[0]  # same length, same placeholder ids
    assert again.num_cached_tokens >= 8
    assert other.num_cached_tokens == 0


def test_prompt_embeds_need_the_flag(qwen2_checkpoint, embeds):
    llm = LLM(qwen2_checkpoint, block_size=4, kv_cache_memory="8MiB")
    with pytest.raises(ValueError, match="enable-prompt-embeds"):
        llm.generate({"prompt_embeds": embeds}, GREEDY)


def test_wrong_hidden_size_is_refused(llm, embeds):
    with pytest.raises(ValueError, match="hidden size"):
        llm.generate({"prompt_embeds": embeds[:, :-1]}, GREEDY)


def test_prompt_logprobs_of_embeddings_are_refused_before_any_prompt_starts(llm, ids, embeds):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        llm.generate([ids.tolist(), {"prompt_embeds": embeds}], SamplingParams(max_tokens=2, prompt_logprobs=1))
    assert generated(llm, {"prompt_embeds": embeds}) == generated(llm, ids.tolist())

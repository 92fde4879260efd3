"""`SamplingParams.prompt_logprobs`: every prompt token's logprob equals transformers' log-softmax of the prompt,
whatever the chunking, the cache state or the batch; -1 gives the vocabulary, within --max-logprobs."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoModelForCausalLM

from loomserve import LLM, SamplingParams

PROMPT = "the cat sat on the mat and then it walked over the lazy dog to the river"
TOP = 3
ASK = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=TOP)


@functools.cache
def reference(path: str, token_ids: tuple[int, ...]) -> torch.Tensor:
    """[P - 1, V]: transformers' log-softmax at each prompt position but the last (what predicts the next token)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0, :-1].float()
    return logits.log_softmax(dim=-1)


def assert_equals_reference(path: str, output) -> None:
    ids = output.prompt_token_ids
    expected = reference(path, tuple(ids))
    got = output.prompt_logprobs
    assert len(got) == len(ids) and got[0] is None
    for position, (token, entry) in enumerate(zip(ids[1:], got[1:])):
        row = expected[position]
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert entry[token].rank == int((row >= row[token]).sum())
        top = [t for t in entry if entry[t].rank <= TOP]
        assert sorted(top) == sorted(row.topk(TOP).indices.tolist())
        assert [entry[t].logprob for t in top] == pytest.approx([row[t].item() for t in top], abs=1e-4)


@pytest.fixture(scope="module")
def llm(qwen2_checkpoint) -> LLM:
    return LLM(qwen2_checkpoint, block_size=4, kv_cache_memory="32MiB", max_logprobs=-1)


def test_prompt_logprobs_equal_transformers_log_softmax(llm, qwen2_checkpoint):
    assert_equals_reference(qwen2_checkpoint, llm.generate(PROMPT, ASK)[0])


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_prompt_logprobs_are_collected_across_prefill_chunks(qwen2_checkpoint, async_scheduling):
    chunked = LLM(qwen2_checkpoint, block_size=4, kv_cache_memory="32MiB", max_num_batched_tokens=5,
                  async_scheduling=async_scheduling)
    outputs = chunked.generate([PROMPT, "a much shorter one"], ASK)
    for output in outputs:
        assert_equals_reference(qwen2_checkpoint, output)


def test_a_cached_prompt_is_run_again_for_its_logprobs(llm, qwen2_checkpoint):
    llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=2))  # fills the prefix cache
    output = llm.generate(PROMPT, ASK)[0]
    assert output.num_cached_tokens == 0
    assert_equals_reference(qwen2_checkpoint, output)


def test_only_requests_that_ask_get_prompt_logprobs(llm):
    plain, asked = llm.generate([PROMPT, PROMPT], [SamplingParams(max_tokens=2), ASK])
    assert plain.prompt_logprobs is None and asked.prompt_logprobs is not None


def test_n_children_share_one_set_of_prompt_logprobs(llm, qwen2_checkpoint):
    output = llm.generate(PROMPT, SamplingParams(n=3, max_tokens=2, prompt_logprobs=TOP, seed=0))[0]
    assert len(output.outputs) == 3
    assert_equals_reference(qwen2_checkpoint, output)


def test_a_one_token_prompt_has_only_the_first_none(llm):
    output = llm.generate([[7]], ASK)[0]
    assert output.prompt_logprobs == [None]


def test_minus_one_gives_the_whole_vocabulary(llm):
    output = llm.generate(PROMPT, SamplingParams(max_tokens=1, prompt_logprobs=-1, logprobs=-1))[0]
    vocab = llm.config.model_config.vocab_size
    for entry in [*output.prompt_logprobs[1:], output.outputs[0].logprobs[0]]:
        assert sorted(entry) == list(range(vocab))
        assert torch.tensor([lp.logprob for lp in entry.values()]).exp().sum().item() == pytest.approx(1.0, abs=1e-4)


def test_more_prompt_logprobs_than_max_logprobs_is_refused(qwen2_checkpoint):
    capped = LLM(qwen2_checkpoint, block_size=4, kv_cache_memory="8MiB", max_logprobs=2)
    with pytest.raises(ValueError, match="prompt_logprobs.*--max-logprobs"):
        capped.generate(PROMPT, SamplingParams(prompt_logprobs=3))
    with pytest.raises(ValueError, match="logprobs.*--max-logprobs"):
        capped.generate(PROMPT, SamplingParams(logprobs=-1))

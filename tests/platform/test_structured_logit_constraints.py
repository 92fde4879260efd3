"""The sampler's logits constraints against transformers on the same checkpoint: `logit_bias` is its
`sequence_bias` for single tokens, `bad_words` its `bad_words_ids` over the words as vLLM tokenizes them;
`allowed_token_ids` keeps every other token out; the grammar bitmask masks its requests' logits rows."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from loomserve import LLM, SamplingParams
from loomserve.platform.logit_constraints import tokenize_bad_words
from loomserve.platform.structured.bitmask import StructuredStep, apply_structured_bitmask

PROMPT = "the cat sat on the mat and then it"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def llm(qwen2_checkpoint) -> LLM:
    return LLM(qwen2_checkpoint, block_size=4, kv_cache_memory="32MiB")


@pytest.fixture(scope="module")
def hf_model(qwen2_checkpoint):
    return AutoModelForCausalLM.from_pretrained(qwen2_checkpoint, dtype=torch.float32)


def greedy(llm: LLM, **constraints) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, **constraints)
    return llm.generate(PROMPT, params)[0].outputs[0].token_ids


def hf_greedy(llm: LLM, model, **kwargs) -> list[int]:
    ids = torch.tensor([llm.get_tokenizer().encode(PROMPT)])
    out = model.generate(ids, do_sample=False, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, **kwargs)
    return out[0, ids.shape[1]:].tolist()


def test_logit_bias_equals_transformers_sequence_bias(llm, hf_model):
    free = greedy(llm)
    bias = {free[0]: -30.0, free[1]: 4.5, 7: 100.0 / 3}
    biased = greedy(llm, logit_bias=bias)
    assert biased != free
    assert biased == hf_greedy(llm, hf_model, sequence_bias={(t,): b for t, b in bias.items()})


def test_bad_words_equal_transformers_bad_words_ids(llm, hf_model):
    free_text = llm.get_tokenizer().decode(greedy(llm))
    words = free_text.split()[:2]  # what greedy says unhindered, so banning it changes the output
    banned = greedy(llm, bad_words=words)
    assert banned != greedy(llm)
    bad_words_ids = tokenize_bad_words(llm.get_tokenizer(), words)
    assert banned == hf_greedy(llm, hf_model, bad_words_ids=bad_words_ids)


def test_allowed_token_ids_keep_every_other_token_out(llm):
    allowed = [5, 17, 99, 123]
    assert set(greedy(llm, allowed_token_ids=allowed)) <= set(allowed)
    sampled = SamplingParams(temperature=1.0, seed=0, max_tokens=MAX_TOKENS, ignore_eos=True, allowed_token_ids=allowed)
    assert set(llm.generate(PROMPT, sampled)[0].outputs[0].token_ids) <= set(allowed)


def test_out_of_vocabulary_ids_are_refused(llm):
    vocab = llm.get_tokenizer().__len__()
    with pytest.raises(ValueError, match="logit_bias"):
        greedy(llm, logit_bias={vocab + 5: 1.0})
    with pytest.raises(ValueError, match="allowed_token_ids"):
        greedy(llm, allowed_token_ids=[-1])


def test_bitmask_rows_reach_their_requests_logits_rows():
    """Rows follow the runner's batch order, 1 + k per request verifying k drafts; others stay untouched."""
    vocab = 70
    allowed = torch.rand(3, vocab) < 0.5  # [R, V]: request "b" has a draft, so two rows
    bits = torch.zeros(3, 96, dtype=torch.int64)
    bits[:, :vocab] = allowed.long()
    words = (bits.view(3, 3, 32) << torch.arange(32)).sum(-1)  # [R, W] as unsigned 32-bit values
    bitmask = torch.where(words < 2**31, words, words - 2**32).to(torch.int32)
    data = StructuredStep(["c", "b"], [0, 1], bitmask)
    batch = SimpleNamespace(sample_requests=[SimpleNamespace(request_id=i) for i in "abc"], drafts=[[], [9], []])
    logits = torch.randn(4, vocab)  # rows: a, b, b's draft, c
    masked = logits.clone()
    apply_structured_bitmask(masked, data, batch)
    expected = torch.stack([logits[0], *(logits[r].masked_fill(~allowed[i], -float("inf"))
                                         for i, r in ((1, 1), (2, 2), (0, 3)))])
    assert torch.equal(masked, expected)

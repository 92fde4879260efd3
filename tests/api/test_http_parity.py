"""Greedy output over HTTP equals the Python API's (`loomserve.LLM`) for the same prompt token ids."""

from __future__ import annotations

import pytest

from loomserve import LLM, SamplingParams

PROMPTS = ["Hello, world!", "The train to Berlin leaves from platform", "café naïve 日本語"]
MESSAGES = [{"role": "user", "content": "Write a short poem about the ocean."}]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def llm(qwen2_checkpoint) -> LLM:
    return LLM(qwen2_checkpoint, kv_cache_memory="16MiB")


def greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)


def test_completions_equal_the_python_api(llm, client, model):
    tokenizer = llm.get_tokenizer()
    prompt_ids = [tokenizer.encode(p) for p in PROMPTS]
    expected = [o.outputs[0] for o in llm.generate(prompt_ids, greedy())]
    out = client.completions.create(
        model=model, prompt=prompt_ids, max_tokens=MAX_TOKENS, temperature=0, logprobs=0,
        extra_body={"ignore_eos": True},
    )
    assert [c.text for c in out.choices] == [e.text for e in expected]
    for choice, e in zip(out.choices, expected):
        assert choice.logprobs.tokens == [tokenizer.decode([t]) for t in e.token_ids]
        logprobs = [step[t].logprob for step, t in zip(e.logprobs, e.token_ids)]
        assert choice.logprobs.token_logprobs == pytest.approx(logprobs, abs=1e-4)
    assert out.usage.completion_tokens == sum(len(e.token_ids) for e in expected)


def test_chat_equals_the_python_api(llm, client, model):
    [expected] = llm.chat(MESSAGES, greedy())
    out = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.choices[0].message.content == expected.outputs[0].text
    assert out.usage.prompt_tokens == len(expected.prompt_token_ids)

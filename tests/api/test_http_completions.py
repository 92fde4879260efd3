"""POST /v1/completions through the openai client: prompts of every form, n, logprobs, stops, seeds, usage."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def complete(client, model) -> Callable:
    """client.completions.create with test defaults; `extra` holds vLLM's fields (ignore_eos on by default)."""

    def run(extra: dict | None = None, **kwargs):
        kwargs = {"model": model, "prompt": PROMPT, "max_tokens": 12, **kwargs}
        return client.completions.create(extra_body={"ignore_eos": True, **(extra or {})}, **kwargs)

    return run


@pytest.fixture(scope="module")
def greedy_text(complete) -> Callable:
    return lambda **kwargs: complete(temperature=0, **kwargs).choices[0].text


def count_tokens(http, prompt: str) -> int:
    return http.post("/tokenize", json={"prompt": prompt}).json()["count"]


def test_completion_shape_and_usage(complete, model, http):
    out = complete(temperature=0, max_tokens=7)
    assert out.id.startswith("cmpl-") and out.object == "text_completion" and out.model == model
    assert out.created > 0
    [choice] = out.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    prompt_tokens = count_tokens(http, PROMPT)
    assert out.usage.prompt_tokens == prompt_tokens
    assert out.usage.completion_tokens == 7
    assert out.usage.total_tokens == prompt_tokens + 7


def test_greedy_is_deterministic(greedy_text):
    assert greedy_text() == greedy_text()


def test_prompt_forms_give_choice_groups(complete, greedy_text, http):
    """Text or token ids, one or a list: n choices per prompt, choice index = prompt index * n + i."""
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    alone = greedy_text()
    assert greedy_text(prompt=ids) == alone
    out = complete(prompt=[PROMPT, "Hello", PROMPT], n=2, temperature=0)
    assert [c.index for c in out.choices] == list(range(6))
    texts = [c.text for c in out.choices]
    assert texts[0] == texts[1] == texts[4] == texts[5] == alone
    assert texts[2] == texts[3] == greedy_text(prompt="Hello")
    assert out.usage.prompt_tokens == 2 * len(ids) + count_tokens(http, "Hello")
    assert out.usage.completion_tokens == 6 * 12
    batched = complete(prompt=[ids, ids], temperature=0)
    assert [c.text for c in batched.choices] == [alone, alone]


def test_max_tokens_gives_length(complete):
    out = complete(max_tokens=3, logprobs=0)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 3 and len(out.choices[0].logprobs.tokens) == 3


def test_n_samples_differ_under_a_seed(complete):
    out = complete(n=3, temperature=1.0, seed=7, max_tokens=16)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len({c.text for c in out.choices}) == 3
    assert out.usage.completion_tokens == 48


def test_seed_reproduces_sampling(complete):
    def sample(seed: int) -> str:
        return complete(temperature=1.0, seed=seed, max_tokens=16).choices[0].text

    assert sample(1234) == sample(1234)
    assert sample(1234) != sample(4321)


def test_logprobs(complete):
    out = complete(temperature=0, logprobs=3, max_tokens=8)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    for logprob, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 1 <= len(top) <= 4
        assert logprob == max(top.values())  # greedy takes the most likely token
    assert lp.text_offset[0] == 0
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]


def test_stop_string(complete, greedy_text):
    text = greedy_text(max_tokens=24)
    stop = next(text[i : i + 2] for i in range(3, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    cut = text.index(stop)
    out = complete(temperature=0, max_tokens=24, stop=[stop, "never-seen-here"])
    assert out.choices[0].text == text[:cut]
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].model_extra["stop_reason"] == stop
    kept = complete(temperature=0, max_tokens=24, stop=stop, extra={"include_stop_str_in_output": True})
    assert kept.choices[0].text == text[: cut + len(stop)]


def test_echo(complete, greedy_text):
    out = complete(temperature=0, echo=True)
    assert out.choices[0].text == PROMPT + greedy_text()


def test_streaming_matches_whole_answer(complete):
    args = {"temperature": 0, "n": 2, "prompt": [PROMPT, "Hello"], "max_tokens": 10}
    whole = complete(**args)
    chunks = list(complete(**args, stream=True, stream_options={"include_usage": True}))
    texts = ["" for _ in range(4)]
    finish = {}
    for chunk in chunks[:-1]:
        assert chunk.id == chunks[0].id and chunk.usage is None
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert texts == [c.text for c in whole.choices]
    assert finish == {i: "length" for i in range(4)}
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens
    )


def test_stream_frames_are_sse(http, model):
    body = {"model": model, "prompt": PROMPT, "max_tokens": 4, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        assert json.loads(event.removeprefix("data: "))["object"] == "text_completion"

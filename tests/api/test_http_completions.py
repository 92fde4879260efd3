"""POST /v1/completions through the openai client: prompts of every form, n, logprobs, stops, seeds, usage."""

from __future__ import annotations

import json

import openai

from tests.api.conftest import MODEL

PROMPT = "The quick brown fox"


def complete(client: openai.OpenAI, **kwargs):
    return client.completions.create(model=MODEL, **{"prompt": PROMPT, "max_tokens": 12, **kwargs})


def greedy_text(client: openai.OpenAI, **kwargs) -> str:
    return complete(client, temperature=0, **kwargs).choices[0].text


def test_completion_shape_and_usage(client, http):
    out = complete(client, temperature=0, max_tokens=7, ignore_eos=True)
    assert out.id.startswith("cmpl-") and out.object == "text_completion" and out.model == MODEL
    assert out.created > 0
    [choice] = out.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    prompt_tokens = http.post("/tokenize", json={"prompt": PROMPT}).json()["count"]
    assert out.usage.prompt_tokens == prompt_tokens
    assert out.usage.completion_tokens == 7
    assert out.usage.total_tokens == prompt_tokens + 7


def test_greedy_is_deterministic(client):
    assert greedy_text(client) == greedy_text(client)


def test_prompt_forms_give_choice_groups(client, http):
    """A list of prompts (text or token ids) gives n choices per prompt, index = prompt * n + i."""
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    alone = greedy_text(client)
    assert greedy_text(client, prompt=ids) == alone
    out = complete(client, prompt=[PROMPT, "Hello", ids], n=2, temperature=0)
    assert [c.index for c in out.choices] == list(range(6))
    texts = [c.text for c in out.choices]
    assert texts[0] == texts[1] == texts[4] == texts[5] == alone
    assert out.usage.prompt_tokens == 2 * len(ids) + len(http.post("/tokenize", json={"prompt": "Hello"}).json()["tokens"])
    assert out.usage.completion_tokens == sum(len(t) > 0 for t in texts) * 0 + out.usage.total_tokens - out.usage.prompt_tokens
    batched = complete(client, prompt=[ids, ids], temperature=0)
    assert [c.text for c in batched.choices] == [alone, alone]


def test_max_tokens_gives_length(client):
    out = complete(client, max_tokens=3, ignore_eos=True, logprobs=0)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 3 and len(out.choices[0].logprobs.tokens) == 3


def test_n_samples_differ_under_a_seed(client):
    out = complete(client, n=3, temperature=1.0, seed=7, max_tokens=16, ignore_eos=True)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len({c.text for c in out.choices}) == 3
    assert out.usage.completion_tokens == 48


def test_seed_reproduces_sampling(client):
    def sample(seed: int) -> str:
        return complete(client, temperature=1.0, seed=seed, max_tokens=16, ignore_eos=True).choices[0].text

    assert sample(1234) == sample(1234)
    assert sample(1234) != sample(4321)


def test_logprobs(client):
    out = complete(client, temperature=0, logprobs=3, max_tokens=8, ignore_eos=True)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 1 <= len(top) <= 4
        assert logprob == max(top.values())  # greedy takes the most likely token
        assert top.get(token) == logprob
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_stop_string(client):
    text = greedy_text(client, max_tokens=24, ignore_eos=True)
    stop = next(text[i : i + 2] for i in range(3, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    cut = text.index(stop)
    out = complete(client, temperature=0, max_tokens=24, ignore_eos=True, stop=[stop, "never-seen-here"])
    assert out.choices[0].text == text[:cut]
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].model_extra["stop_reason"] == stop
    kept = complete(client, temperature=0, max_tokens=24, ignore_eos=True, stop=stop,
                    extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == text[: cut + len(stop)]


def test_echo(client):
    out = complete(client, temperature=0, echo=True)
    assert out.choices[0].text == PROMPT + greedy_text(client)


def test_streaming_matches_whole_answer(client):
    whole = complete(client, temperature=0, n=2, prompt=[PROMPT, "Hello"], max_tokens=10, ignore_eos=True)
    chunks = list(complete(client, temperature=0, n=2, prompt=[PROMPT, "Hello"], max_tokens=10,
                           ignore_eos=True, stream=True, stream_options={"include_usage": True}))
    texts = {i: "" for i in range(4)}
    finish = {}
    for chunk in chunks[:-1]:
        assert chunk.id == chunks[0].id and chunk.usage is None
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert [texts[i] for i in range(4)] == [c.text for c in whole.choices]
    assert finish == {i: "length" for i in range(4)}
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_stream_frames_are_sse(http):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        assert json.loads(event[len("data: "):])["object"] == "text_completion"

"""vLLM's generation details on the shared server: `stream_options` only with `stream=true`, usage in every chunk
under `continuous_usage_stats`, each of n choices streaming exactly its own tokens, and the batch chat route."""

from __future__ import annotations

from collections import defaultdict

import openai
import pytest

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Hello there"}]
IGNORE_EOS = {"ignore_eos": True}


@pytest.mark.parametrize("stream_options", [{"include_usage": True}, {"include_usage": None}, {}])
def test_stream_options_without_streaming_is_a_400(client, model, stream_options):
    with pytest.raises(openai.BadRequestError, match="Stream options can only be defined when `stream=True`"):
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2, stream_options=stream_options)
    with pytest.raises(openai.BadRequestError, match="Stream options can only be defined when `stream=True`"):
        client.completions.create(model=model, prompt=PROMPT, max_tokens=2, stream_options=stream_options)


def test_continuous_usage_stats_put_usage_in_every_chunk(client, model):
    chunks = list(client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=6, stream=True, extra_body=IGNORE_EOS,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert all(c.usage is not None for c in chunks)
    assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in chunks)
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 6
    assert chunks[-1].choices == [] and chunks[-2].choices[0].finish_reason == "length"


def test_usage_chunk_only_when_asked(client, model):
    plain = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=3, stream=True))
    assert all(c.usage is None for c in plain)
    asked = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=3, stream=True,
                                           stream_options={"include_usage": True}))
    assert all(c.usage is None for c in asked[:-1]) and asked[-1].usage.completion_tokens == 3


def test_each_of_n_streamed_completions_gets_one_chunk_per_token(client, model):
    n, max_tokens = 3, 20
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, n=n, stream=True,
                                       temperature=1.0, seed=3, extra_body=IGNORE_EOS)
    texts, finishes = defaultdict(list), defaultdict(int)
    for chunk in stream:
        [choice] = chunk.choices
        texts[choice.index].append(choice.text)
        finishes[choice.index] += choice.finish_reason is not None
    assert {i: len(t) for i, t in texts.items()} == dict.fromkeys(range(n), max_tokens)
    assert finishes == dict.fromkeys(range(n), 1)


def test_each_of_n_streamed_chat_choices_starts_with_its_role_and_no_empty_chunk(client, model):
    stream = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, n=3, stream=True,
                                            temperature=1.0, seed=5, extra_body=IGNORE_EOS)
    deltas = defaultdict(list)
    for chunk in stream:
        [choice] = chunk.choices
        deltas[choice.index].append(choice)
    assert set(deltas) == {0, 1, 2}
    for choices in deltas.values():
        assert choices[0].delta.role == "assistant" and all(c.delta.role is None for c in choices[1:])
        assert all(c.delta.content or c.finish_reason for c in choices[1:])  # nothing empty after the role


def test_batch_chat_answers_each_conversation_as_its_own_chat(client, http, model):
    conversations = [MESSAGES, [{"role": "user", "content": "What is 2 + 2?"}]]
    body = {"model": model, "messages": conversations, "max_tokens": 5, "temperature": 0, **IGNORE_EOS}
    response = http.post("/v1/chat/completions/batch", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["object"] == "chat.completion" and [c["index"] for c in answer["choices"]] == [0, 1]
    singles = [client.chat.completions.create(model=model, messages=m, max_tokens=5, temperature=0,
                                              extra_body=IGNORE_EOS) for m in conversations]
    assert [c["message"]["content"] for c in answer["choices"]] == [s.choices[0].message.content for s in singles]
    assert answer["usage"]["completion_tokens"] == 10
    assert answer["usage"]["prompt_tokens"] == sum(s.usage.prompt_tokens for s in singles)


@pytest.mark.parametrize(("fields", "reason"), [
    ({"stream": True}, "Streaming is not supported"),
    ({"n": 2}, "`n` must be 1"),
    ({"messages": []}, "at least one conversation"),
])
def test_batch_chat_refusals_are_400(http, model, fields, reason):
    body = {"model": model, "messages": [MESSAGES], "max_tokens": 2, **fields}
    response = http.post("/v1/chat/completions/batch", json=body)
    assert response.status_code == 400 and reason in response.json()["error"]["message"]


def test_tokenizer_info_is_off_by_default(http):
    assert http.get("/tokenizer_info").status_code == 404
    assert http.get("/load").status_code == 404


def test_tokenize_returns_token_strings_when_asked(http):
    plain = http.post("/tokenize", json={"prompt": PROMPT}).json()
    assert plain["token_strs"] is None
    asked = http.post("/tokenize", json={"prompt": PROMPT, "return_token_strs": True}).json()
    assert asked["tokens"] == plain["tokens"] and len(asked["token_strs"]) == asked["count"]
    assert http.post("/detokenize", json={"tokens": asked["tokens"]}).json()["prompt"] == PROMPT
    assert "".join(asked["token_strs"]).replace("Ġ", " ") == PROMPT  # byte-level BPE marks spaces with Ġ

"""POST /v1/chat/completions through the openai client: template, n, logprobs, streaming, usage."""

from __future__ import annotations

from collections.abc import Callable

import pytest

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def chat(client, model) -> Callable:
    """client.chat.completions.create with test defaults; `extra` holds vLLM's fields."""

    def run(extra: dict | None = None, **kwargs):
        kwargs = {"model": model, "messages": MESSAGES, "max_tokens": 12, **kwargs}
        return client.chat.completions.create(extra_body={"ignore_eos": True, **(extra or {})}, **kwargs)

    return run


@pytest.fixture(scope="module")
def complete_text(client, model) -> Callable:
    def run(prompt: str) -> str:
        out = client.completions.create(
            model=model, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
        )
        return out.choices[0].text

    return run


def test_chat_shape_and_usage(chat, model, http):
    out = chat(temperature=0, max_completion_tokens=6)
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion" and out.model == model
    [choice] = out.choices
    assert choice.index == 0 and choice.finish_reason == "length"
    assert choice.message.role == "assistant" and choice.message.content
    rendered = http.post("/tokenize", json={"messages": MESSAGES}).json()
    assert out.usage.prompt_tokens == rendered["count"]
    assert out.usage.completion_tokens == 6
    assert out.usage.total_tokens == rendered["count"] + 6


def test_chat_renders_the_template(chat, complete_text):
    """A chat is the completion of its rendered template (ChatML for the tiny qwen2)."""
    prompt = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" \
             "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert chat(temperature=0).choices[0].message.content == complete_text(prompt)


def test_text_parts_equal_plain_content(chat):
    parts = [
        MESSAGES[0],
        {"role": "user", "content": [{"type": "text", "text": "What is the capital"},
                                     {"type": "text", "text": "of France?"}]},
    ]
    plain = [MESSAGES[0], {"role": "user", "content": "What is the capital\nof France?"}]
    assert chat(messages=parts, temperature=0).choices[0].message.content == \
        chat(messages=plain, temperature=0).choices[0].message.content


def test_n_and_seed(chat):
    out = chat(n=3, temperature=1.0, seed=11)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len({c.message.content for c in out.choices}) == 3
    again = chat(n=3, temperature=1.0, seed=11)
    assert [c.message.content for c in again.choices] == [c.message.content for c in out.choices]
    assert out.usage.completion_tokens == 36


def test_logprobs(chat):
    out = chat(temperature=0, logprobs=True, top_logprobs=3, max_tokens=6)
    content = out.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    plain = chat(temperature=0, logprobs=True, max_tokens=2).choices[0].logprobs.content
    assert [e.top_logprobs for e in plain] == [[], []]
    assert chat(temperature=0, max_tokens=2).choices[0].logprobs is None


def test_stop_string(chat):
    text = chat(temperature=0, max_tokens=20).choices[0].message.content
    stop = next(text[i : i + 2] for i in range(3, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    out = chat(temperature=0, max_tokens=20, stop=stop)
    assert out.choices[0].message.content == text[: text.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_streaming(chat):
    whole = chat(temperature=0, n=2, logprobs=True, top_logprobs=1)
    chunks = list(chat(temperature=0, n=2, logprobs=True, top_logprobs=1, stream=True,
                       stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    first_deltas = {}
    texts, tokens, finish = ["", ""], [[], []], {}
    for chunk in chunks[:-1]:
        assert chunk.usage is None
        [c] = chunk.choices
        first_deltas.setdefault(c.index, c.delta)
        texts[c.index] += c.delta.content or ""
        tokens[c.index] += [e.token for e in c.logprobs.content] if c.logprobs else []
        if c.finish_reason:
            finish[c.index] = c.finish_reason
    assert all(d.role == "assistant" and d.content == "" for d in first_deltas.values())
    assert texts == [c.message.content for c in whole.choices]
    assert tokens == [[e.token for e in c.logprobs.content] for c in whole.choices]
    assert finish == {0: "length", 1: "length"}
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 24
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_stream_without_usage_has_none(chat):
    chunks = list(chat(temperature=0, max_tokens=3, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)

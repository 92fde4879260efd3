"""vLLM's logprob and search fields over HTTP, through the openai client: prompt_logprobs, echo with logprobs,
logprobs = -1 within --max-logprobs, return_tokens_as_token_ids, return_token_ids, best_of and use_beam_search."""

from __future__ import annotations

import functools
from collections.abc import Callable

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from loomserve.api.logprobs import chat_logprobs
from loomserve.platform.request import Logprob

PROMPT = "The quick brown fox jumps over"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@functools.cache
def hf_model(path: str) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # searches that agree with vLLM's: no beam ends early
    return model


def hf_prompt_logprobs(path: str, token_ids: list[int]) -> torch.Tensor:
    """[P - 1, V] transformers' log-softmax at each prompt position but the last."""
    with torch.no_grad():
        return hf_model(path)(torch.tensor([token_ids])).logits[0, :-1].float().log_softmax(dim=-1)


@pytest.fixture(scope="module")
def complete(client, model) -> Callable:
    """client.completions.create; `extra` holds vLLM's fields (ignore_eos on)."""

    def run(extra: dict | None = None, **kwargs):
        kwargs = {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, **kwargs}
        return client.completions.create(extra_body={"ignore_eos": True, **(extra or {})}, **kwargs)

    return run


@pytest.fixture(scope="module")
def chat(client, model) -> Callable:
    def run(extra: dict | None = None, **kwargs):
        kwargs = {"model": model, "messages": MESSAGES, "max_tokens": 4, "temperature": 0, **kwargs}
        return client.chat.completions.create(extra_body={"ignore_eos": True, **(extra or {})}, **kwargs)

    return run


def assert_prompt_logprobs_equal_transformers(path: str, token_ids: list[int], prompt_logprobs: list, k: int) -> None:
    expected = hf_prompt_logprobs(path, token_ids)
    assert len(prompt_logprobs) == len(token_ids) and prompt_logprobs[0] is None
    for row, token, entry in zip(expected, token_ids[1:], prompt_logprobs[1:], strict=True):
        entry = {int(t): lp for t, lp in entry.items()}
        assert entry[token]["logprob"] == pytest.approx(row[token].item(), abs=1e-4)
        assert entry[token]["rank"] == int((row >= row[token]).sum())
        top = sorted(t for t, lp in entry.items() if lp["rank"] <= k)
        assert top == sorted(row.topk(k).indices.tolist())


def bad_request(call: Callable, **kwargs) -> dict:
    with pytest.raises(openai.BadRequestError) as info:
        call(**kwargs)
    return info.value.body


def test_completion_prompt_logprobs_equal_transformers(complete, qwen2_checkpoint):
    [choice] = complete(extra={"prompt_logprobs": 2, "return_token_ids": True}).choices
    assert_prompt_logprobs_equal_transformers(qwen2_checkpoint, choice.prompt_token_ids, choice.prompt_logprobs, 2)


def test_chat_prompt_logprobs_equal_transformers(chat, qwen2_checkpoint):
    out = chat(extra={"prompt_logprobs": 1, "return_token_ids": True})
    assert_prompt_logprobs_equal_transformers(qwen2_checkpoint, out.prompt_token_ids, out.prompt_logprobs, 1)


def test_echo_with_logprobs_puts_the_prompt_tokens_first(complete):
    out = complete(echo=True, logprobs=2, extra={"return_token_ids": True})
    [choice] = out.choices
    lp, prompt_ids = choice.logprobs, choice.prompt_token_ids
    assert choice.text.startswith(PROMPT)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(prompt_ids) + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i, token_id in enumerate(prompt_ids[1:], start=1):
        assert lp.token_logprobs[i] == pytest.approx(choice.prompt_logprobs[i][str(token_id)]["logprob"])
        assert len(lp.top_logprobs[i]) in (2, 3)  # the top 2 and the prompt token, when it is not among them
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    plain = complete(logprobs=2).choices[0]
    assert lp.token_logprobs[len(prompt_ids):] == plain.logprobs.token_logprobs
    assert choice.text == PROMPT + plain.text


def test_streamed_echo_with_logprobs_sends_the_prompt_in_the_first_chunk(complete):
    whole = complete(echo=True, logprobs=1).choices[0].logprobs
    chunks = [c.choices[0] for c in complete(echo=True, logprobs=1, stream=True) if c.choices]
    assert chunks[0].text.startswith(PROMPT)
    assert [t for c in chunks for t in c.logprobs.token_logprobs] == whole.token_logprobs
    first = chunks[0].logprobs.text_offset
    assert first == whole.text_offset[: len(first)]  # later offsets follow the streamed text (held-back bytes)


@pytest.mark.parametrize(
    ("route", "fields", "param"),
    [
        ("completions", {"logprobs": -1}, "logprobs"),
        ("completions", {"logprobs": 21}, "logprobs"),
        ("completions", {"extra": {"prompt_logprobs": 21}}, "prompt_logprobs"),
        ("chat", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ],
)
def test_more_logprobs_than_max_logprobs_is_a_400_naming_the_field(complete, chat, route, fields, param):
    body = bad_request(complete if route == "completions" else chat, **fields)
    assert body["param"] == param and "--max-logprobs" in body["message"]


def test_prompt_logprobs_cannot_stream(complete):
    assert "prompt_logprobs" in bad_request(complete, stream=True, extra={"prompt_logprobs": 1})["message"]


def test_return_tokens_as_token_ids_names_tokens_by_id(complete, chat):
    choice = complete(logprobs=2, extra={"return_tokens_as_token_ids": True, "return_token_ids": True}).choices[0]
    assert choice.logprobs.tokens == [f"token_id:{t}" for t in choice.token_ids]
    assert all(key.startswith("token_id:") for top in choice.logprobs.top_logprobs for key in top)
    content = chat(logprobs=True, top_logprobs=2,
                   extra={"return_tokens_as_token_ids": True, "return_token_ids": True}).choices[0]
    assert [e.token for e in content.logprobs.content] == [f"token_id:{t}" for t in content.token_ids]
    assert content.logprobs.content[0].bytes == list(content.logprobs.content[0].token.encode())


def test_return_token_ids_gives_prompt_and_output_ids(complete, chat, http):
    choice = complete(extra={"return_token_ids": True}).choices[0]
    assert choice.prompt_token_ids == http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    assert len(choice.token_ids) == 4
    assert complete().choices[0].model_extra.get("token_ids") is None
    streamed = [c.choices[0] for c in complete(stream=True, extra={"return_token_ids": True}) if c.choices]
    assert streamed[0].prompt_token_ids == choice.prompt_token_ids
    assert [t for c in streamed for t in c.token_ids] == choice.token_ids
    whole = chat(extra={"return_token_ids": True})
    chunks = list(chat(stream=True, extra={"return_token_ids": True}))
    assert chunks[0].prompt_token_ids == whole.prompt_token_ids
    assert [t for c in chunks for ch in c.choices for t in ch.token_ids or []] == whole.choices[0].token_ids


def test_best_of_returns_the_candidates_of_highest_cumulative_logprob(complete):
    seeded = {"temperature": 1.0, "seed": 7, "max_tokens": 5}
    candidates = complete(n=4, logprobs=0, **seeded).choices
    ranked = sorted(candidates, key=lambda c: sum(c.logprobs.token_logprobs), reverse=True)
    best = complete(n=2, extra={"best_of": 4}, **seeded).choices
    assert [c.index for c in best] == [0, 1]
    assert [c.text for c in best] == [c.text for c in ranked[:2]]
    assert best[0].logprobs is None


def test_best_of_above_n_cannot_stream_and_below_n_is_refused(complete):
    assert "best_of" in bad_request(complete, n=1, stream=True, extra={"best_of": 2})["message"]
    assert "best_of" in bad_request(complete, n=3, extra={"best_of": 2})["message"]


def test_completion_beam_search_equals_transformers_num_beams(complete, http, qwen2_checkpoint):
    """No beam ends (ignore_eos; transformers without an eos id): there vLLM's search and transformers' agree."""
    out = complete(n=3, max_tokens=5, extra={"use_beam_search": True, "length_penalty": 0.5, "early_stopping": True,
                                             "return_token_ids": True})
    ids = torch.tensor([out.choices[0].prompt_token_ids])
    expected = hf_model(qwen2_checkpoint).generate(
        ids, num_beams=3, num_return_sequences=3, do_sample=False, max_new_tokens=5, length_penalty=0.5,
        early_stopping=True, pad_token_id=0)
    assert [c.token_ids for c in out.choices] == expected[:, ids.shape[1]:].tolist()
    assert [c.finish_reason for c in out.choices] == ["length"] * 3


def test_chat_beam_search_gives_n_beams_best_first(chat):
    out = chat(n=2, max_tokens=3, logprobs=True, extra={"use_beam_search": True})
    assert [c.index for c in out.choices] == [0, 1]
    sums = [sum(e.logprob for e in c.logprobs.content) for c in out.choices]
    assert sums == sorted(sums, reverse=True) and out.usage.completion_tokens == 6
    streamed = [c for c in chat(n=2, max_tokens=3, stream=True, extra={"use_beam_search": True}) if c.choices]
    text = {}
    for chunk in streamed:
        for c in chunk.choices:
            text[c.index] = text.get(c.index, "") + (c.delta.content or "")
    assert [text[0], text[1]] == [c.message.content for c in out.choices]


def test_top_logprobs_minus_one_lists_every_alternative_there_is():
    """What the engine gives for -1 (the whole vocabulary: tests/platform/test_prompt_logprobs.py) all reaches the
    chat shape; the server's default --max-logprobs refuses -1 above (a vocabulary is more than 20)."""
    step = {i: Logprob(-float(i), rank=i + 1, decoded_token=f"t{i}") for i in range(50)}
    [entry] = chat_logprobs([3], [step], num_top=-1).content
    assert [t.token for t in entry.top_logprobs] == [f"t{i}" for i in range(50)]

"""Bad requests get OpenAI-shaped errors with the right status, and the server keeps serving."""

from __future__ import annotations

import openai
import pytest

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["message"]
    return error


def chat_body(model: str, **fields) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **fields}


def test_malformed_json(http):
    response = http.post(COMPLETIONS, content=b'{"prompt": "a", ', headers={"content-type": "application/json"})
    error = error_of(response, 400)
    assert error["type"] == "BadRequestError" and "JSON" in error["message"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"stop": 5}, "stop"),
        ({"seed": 2**70}, "seed"),
        ({"stream_options": "yes"}, "stream_options"),
        ({"messages": "Hi"}, "messages"),
        ({"messages": [{"content": "no role"}]}, "messages"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_wrong_types(http, model, fields, param):
    error = error_of(http.post(CHAT, json=chat_body(model, **fields)), 400)
    assert error["type"] == "BadRequestError" and error["param"] == param


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        (COMPLETIONS, '{"prompt": "a", "temperature": NaN}', "temperature"),
        (COMPLETIONS, '{"prompt": "a\\udcff"}', "prompt"),  # a lone surrogate: no tokenizer takes it
        (COMPLETIONS, '{"prompt": ["a", "\\ud800"]}', "prompt"),
        (CHAT, '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udcff"}]}]}', "messages"),
        ("/tokenize", '{"prompt": "\\udcff"}', "prompt"),
    ],
)
def test_json_that_is_not_text_or_numbers(http, route, body, param):
    response = http.post(route, content=body, headers={"content-type": "application/json"})
    assert error_of(response, 400)["param"] == param


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"logprobs": 21}, "logprobs"),
        ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
        ({"stop": [""]}, "stop"),
        ({"presence_penalty": 3}, "presence_penalty"),
    ],
)
def test_out_of_range_sampling(http, model, fields, needle):
    body = {"model": model, "prompt": "a", "max_tokens": 4, **fields}
    error = error_of(http.post(COMPLETIONS, json=body), 400)
    assert needle in error["message"]


def test_prompt_too_long(http, model):
    max_len = http.get("/v1/models").json()["data"][0]["max_model_len"]
    prompt = [5] * (max_len - 10)
    error = error_of(http.post(COMPLETIONS, json={"model": model, "prompt": prompt, "max_tokens": 20}), 400)
    assert error["message"] == (
        f"This model's maximum context length is {max_len} tokens. However, you requested {max_len + 10} "
        f"tokens ({max_len - 10} in the messages, 20 in the completion). "
        "Please reduce the length of the messages or completion."
    )
    error = error_of(http.post(COMPLETIONS, json={"model": model, "prompt": [5] * max_len}), 400)
    assert f"maximum context length is {max_len} tokens" in error["message"]
    fits = http.post(COMPLETIONS, json={"model": model, "prompt": prompt, "max_tokens": 10})
    assert fits.status_code == 200 and fits.json()["usage"]["total_tokens"] == max_len


def test_chat_too_long(http, model):
    error = error_of(http.post(CHAT, json=chat_body(model, max_tokens=10**6)), 400)
    assert "maximum context length" in error["message"] and f"{10**6} in the completion" in error["message"]
    error = error_of(http.post(CHAT, json=chat_body(model, max_completion_tokens=10**6, max_tokens=1)), 400)
    assert f"{10**6} in the completion" in error["message"]


@pytest.mark.parametrize("prompt", ["", [], [[]], [10**6], [-1]])
def test_empty_or_out_of_vocabulary_prompt(http, model, prompt):
    error_of(http.post(COMPLETIONS, json={"model": model, "prompt": prompt, "max_tokens": 2}), 400)


def test_chat_content_errors(http, model):
    image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    error = error_of(http.post(CHAT, json=chat_body(model, messages=[{"role": "user", "content": image}])), 400)
    assert "text only" in error["message"]
    error_of(http.post(CHAT, json=chat_body(model, messages=[])), 400)
    error_of(http.post(CHAT, json=chat_body(model, messages=[{"role": "user", "content": [{"type": "text"}]}])), 400)
    error = error_of(http.post(CHAT, json=chat_body(model, top_logprobs=2)), 400)
    assert "logprobs" in error["message"]


def test_unknown_model(http, client):
    error = error_of(http.post(CHAT, json=chat_body("no-such-model")), 404)
    assert error["message"] == "The model `no-such-model` does not exist." and error["type"] == "NotFoundError"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="a", max_tokens=2)
    error_of(http.post("/tokenize", json={"model": "no-such-model", "prompt": "a"}), 404)


def test_unknown_route_and_method(http):
    error_of(http.get("/v1/nothing-here"), 404)
    error_of(http.get(COMPLETIONS), 405)


def test_optional_openai_fields_are_accepted(http, model):
    # Fields the server does not implement answer 400 instead (test_http_unknown_fields.py).
    body = chat_body(model, user="someone", tools=None, parallel_tool_calls=True)
    assert http.post(CHAT, json=body).status_code == 200


def test_server_still_serves(http, model):
    assert http.get("/health").status_code == 200
    assert http.post(CHAT, json=chat_body(model)).status_code == 200

"""No silent success: a request field the server does not implement answers 400 naming it (an OpenAI / vLLM field
known to be unimplemented says so; anything else is not a field of the route), at the top level and nested; every
field the server implements stays accepted, as do the message fields OpenAI clients send back."""

from __future__ import annotations

import pytest

ASK = [{"role": "user", "content": "Hello"}]


def error(answer) -> dict:
    assert answer.status_code == 400, answer.text
    return answer.json()["error"]


@pytest.mark.parametrize(("route", "field"), [
    ("/v1/chat/completions", "functions"),
    ("/v1/chat/completions", "web_search_options"),
    ("/v1/completions", "suffix"),
    ("/v1/completions", "vllm_xargs"),
])
def test_a_known_unimplemented_field_is_named_as_not_supported(http, model, route, field):
    body = {"model": model, "max_tokens": 1, field: {"x": 1}}
    body.update({"messages": ASK} if "chat" in route else {"prompt": "Hello"})
    assert error(http.post(route, json=body)) == {
        "message": f"`{field}` is not supported by this server", "type": "BadRequestError", "param": field,
        "code": 400}


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions", "/tokenize"])
def test_an_unknown_field_is_named(http, model, route):
    body = {"model": model, "max_tokens": 1, "temprature": 0.5}
    body.update({"messages": ASK} if route != "/v1/completions" else {"prompt": "Hello"})
    if route == "/tokenize":
        del body["max_tokens"]
    found = error(http.post(route, json=body))
    assert found["message"] == "`temprature` is not a known field of this request" and found["param"] == "temprature"


def test_an_unknown_nested_field_is_named_with_its_path(http, model):
    body = {"model": model, "messages": ASK, "max_tokens": 1, "stream": True,
            "stream_options": {"include_usage": True, "bogus_option": True}}
    assert error(http.post("/v1/chat/completions", json=body))["message"] == \
        "`stream_options.bogus_option` is not a known field of this request"


def test_every_implemented_chat_field_is_accepted(http, model):
    body = {
        "model": model, "messages": [{"role": "system", "content": "Be brief."}, *ASK], "max_tokens": 3,
        "max_completion_tokens": 3, "n": 2, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "min_p": 0.01,
        "stop": ["zzz"], "stop_token_ids": [0], "seed": 7, "presence_penalty": 0.1, "frequency_penalty": 0.1,
        "repetition_penalty": 1.1, "min_tokens": 1, "ignore_eos": True, "include_stop_str_in_output": False,
        "skip_special_tokens": True, "stream": False, "stream_options": None, "user": "u", "cache_salt": "s",
        "kv_transfer_params": None, "logprobs": True, "top_logprobs": 2, "tools": None, "tool_choice": None,
        "parallel_tool_calls": True, "add_generation_prompt": True, "continue_final_message": False,
        "chat_template_kwargs": {"enable_thinking": True}, "reasoning_effort": "low", "include_reasoning": True,
    }
    answer = http.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["choices"]) == 2


def test_every_implemented_completion_field_is_accepted(http, model):
    body = {
        "model": model, "prompt": "Hello", "max_tokens": 3, "n": 1, "temperature": 0, "top_p": 1.0, "top_k": -1,
        "min_p": 0.0, "stop": "zzz", "stop_token_ids": [], "seed": 1, "presence_penalty": 0, "frequency_penalty": 0,
        "repetition_penalty": 1.0, "min_tokens": 0, "ignore_eos": False, "include_stop_str_in_output": False,
        "skip_special_tokens": True, "stream": False, "user": "u", "cache_salt": "s", "logprobs": 1, "echo": False,
    }
    answer = http.post("/v1/completions", json=body)
    assert answer.status_code == 200, answer.text


def test_messages_replayed_from_a_response_are_accepted(client, model):
    first = client.chat.completions.create(model=model, messages=ASK, max_tokens=2)
    # The SDK's message object carries refusal, annotations, audio, function_call, tool_calls...: send it back.
    replayed = [*ASK, first.choices[0].message, {"role": "user", "content": "And?"}]
    assert client.chat.completions.create(model=model, messages=replayed, max_tokens=2).choices

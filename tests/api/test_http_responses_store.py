"""/v1/responses beyond one stateless turn, through the openai client on the tools server (it keeps responses, parses
Hermes tool calls): stored responses read back with GET, `previous_response_id` continuing the stored conversation
as chat would, background responses read later and cancelled, and function tools called, answered and streamed as
the chat path parses them."""

from __future__ import annotations

import json
import time

import openai
import pytest
from tool_templates import TOOLS_MODEL

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                          "required": ["city"], "additionalProperties": False}}
CHAT_WEATHER = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}
ASK = "What is the weather in Paris?"
LONG = "Write a long story."  # the tiny model's answer runs past 900 tokens


@pytest.fixture(scope="module")
def tools_client(tools_server) -> openai.OpenAI:
    return tools_server.client()


def respond(client: openai.OpenAI, **kwargs):
    return client.responses.create(model=TOOLS_MODEL, temperature=0, max_output_tokens=kwargs.pop("tokens", 8),
                                   **kwargs)


def chat(client: openai.OpenAI, messages: list[dict], **kwargs):
    return client.chat.completions.create(model=TOOLS_MODEL, messages=messages, temperature=0,
                                          max_tokens=kwargs.pop("tokens", 8), **kwargs)


def test_a_stored_response_is_read_back_by_its_id(tools_client):
    response = respond(tools_client, input=ASK)
    assert response.store is True
    again = tools_client.responses.retrieve(response.id)
    assert again.model_dump() == response.model_dump()


def test_an_unstored_or_unknown_response_is_a_404(tools_client):
    response = respond(tools_client, input=ASK, store=False)
    assert response.store is False
    for missing in (response.id, "resp-never"):
        with pytest.raises(openai.NotFoundError, match=f"Response with id '{missing}' not found"):
            tools_client.responses.retrieve(missing)
    with pytest.raises(openai.NotFoundError):
        respond(tools_client, input="More?", previous_response_id="resp-never")


def test_previous_response_id_continues_the_stored_conversation(tools_client):
    first = respond(tools_client, input=ASK, instructions="Be brief.")
    second = respond(tools_client, input="And tomorrow?", previous_response_id=first.id, instructions="Be kind.")
    # the earlier instructions are not carried over (OpenAI's rule); the earlier answer is the assistant's turn
    expected = chat(tools_client, [{"role": "system", "content": "Be kind."}, {"role": "user", "content": ASK},
                                   {"role": "assistant", "content": first.output_text},
                                   {"role": "user", "content": "And tomorrow?"}])
    assert second.output_text == (expected.choices[0].message.content or "")
    assert second.usage.input_tokens == expected.usage.prompt_tokens
    assert second.previous_response_id == first.id


def test_a_background_response_is_read_when_done(tools_client):
    started = respond(tools_client, input=ASK, background=True)
    assert started.status == "queued" and started.background is True
    deadline = time.monotonic() + 60
    while (done := tools_client.responses.retrieve(started.id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert done.output_text == respond(tools_client, input=ASK).output_text
    with pytest.raises(openai.BadRequestError, match="Cannot cancel a synchronous response"):
        tools_client.responses.cancel(started.id)


def test_cancel_stops_a_background_response(tools_client, tools_server):
    started = respond(tools_client, input=LONG, background=True, tokens=900)
    cancelled = tools_client.responses.cancel(started.id)
    assert cancelled.status == "cancelled"
    assert tools_client.responses.retrieve(started.id).status == "cancelled"
    deadline = time.monotonic() + 30
    while tools_server.metric("loomserve:num_requests_running") > 0:  # the engine request is aborted, not run out
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_background_needs_store(tools_client):
    with pytest.raises(openai.BadRequestError, match="`background` needs `store`"):
        respond(tools_client, input=ASK, background=True, store=False)


def test_required_tool_choice_answers_valid_function_calls(tools_client):
    # The Responses path forces the call from the first token (the chat path waits for the reasoning to end).
    response = respond(tools_client, input=ASK, tools=[WEATHER], tool_choice="required", tokens=200)
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls and all(c.name == "get_weather" and json.loads(c.arguments)["city"] in ("Paris", "Rome")
                         for c in calls)
    assert all(c.call_id and c.id.startswith("fc") for c in calls)


def test_a_streamed_function_call_adds_up_to_the_whole_one(tools_client):
    whole = respond(tools_client, input=ASK, tools=[WEATHER], tool_choice="required", tokens=200)
    events = list(respond(tools_client, input=ASK, tools=[WEATHER], tool_choice="required", tokens=200, stream=True))
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e.item for e in events if e.type == "response.output_item.done" and e.item.type == "function_call"]
    calls = [item for item in whole.output if item.type == "function_call"]
    assert [(c.name, c.arguments) for c in done] == [(c.name, c.arguments) for c in calls]
    assert arguments == "".join(c.arguments for c in calls)
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_function_call_outputs_continue_as_chat_tool_turns(tools_client):
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
    given = [{"role": "user", "content": ASK}, call,
             {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 21 C"}]
    response = respond(tools_client, input=given, tools=[WEATHER])
    expected = chat(tools_client, [
        {"role": "user", "content": ASK},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"}], tools=[CHAT_WEATHER])
    assert response.usage.input_tokens == expected.usage.prompt_tokens
    assert response.output_text == (expected.choices[0].message.content or "")

"""POST /v1/responses through the openai client on the shared server: the same answer as chat for the same
conversation, whole or as the Responses event stream, output logprobs as chat's, and 400 for what needs the response
store (this server keeps none)."""

from __future__ import annotations

import openai
import pytest

QUESTION = "Tell me about foxes"


def chat_answer(client, model, messages, max_tokens=6):
    return client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)


def test_a_response_answers_as_chat_does(client, model):
    response = client.responses.create(model=model, input=QUESTION, max_output_tokens=6, temperature=0)
    chat = chat_answer(client, model, [{"role": "user", "content": QUESTION}])
    assert response.object == "response" and response.id.startswith("resp-")
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    finished = chat.choices[0].finish_reason
    assert response.status == ("incomplete" if finished == "length" else "completed")
    [message] = response.output
    assert message.role == "assistant" and message.content[0].type == "output_text"


def test_instructions_and_message_input_are_the_chat_conversation(client, model):
    response = client.responses.create(
        model=model, instructions="Be brief.", max_output_tokens=6, temperature=0,
        input=[{"role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
               {"role": "assistant", "content": "Foxes are canids."},
               {"role": "user", "content": "More?"}])
    chat = chat_answer(client, model, [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": QUESTION},
                                       {"role": "assistant", "content": "Foxes are canids."},
                                       {"role": "user", "content": "More?"}])
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens


def test_a_streamed_response_sends_the_responses_events(client, model):
    whole = client.responses.create(model=model, input=QUESTION, max_output_tokens=8, temperature=0)
    events = list(client.responses.create(model=model, input=QUESTION, max_output_tokens=8, temperature=0,
                                          stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] == f"response.{whole.status}"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-2].item.content[0].text == events[-1].response.output_text == whole.output_text


def test_what_needs_a_stored_response_is_refused_without_the_store(client, model):
    response = client.responses.create(model=model, input="hi", max_output_tokens=2)
    assert response.store is False  # `store` (true by default) is dropped quietly, as vLLM does
    for call in (lambda: client.responses.create(model=model, input="hi", previous_response_id=response.id),
                 lambda: client.responses.create(model=model, input="hi", background=True),
                 lambda: client.responses.retrieve(response.id)):
        with pytest.raises(openai.BadRequestError, match="--enable-responses-store"):
            call()


def test_output_logprobs_are_the_chat_logprobs(client, model):
    response = client.responses.create(model=model, input=QUESTION, max_output_tokens=6, temperature=0,
                                       include=["message.output_text.logprobs"], top_logprobs=3)
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                          max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    [part] = response.output[0].content
    assert [lp.model_dump() for lp in part.logprobs] == [lp.model_dump() for lp in chat.choices[0].logprobs.content]
    assert all(len(lp.top_logprobs) == 3 for lp in part.logprobs)
    streamed = client.responses.create(model=model, input=QUESTION, max_output_tokens=6, temperature=0,
                                       include=["message.output_text.logprobs"], top_logprobs=3, stream=True)
    deltas = [lp for e in streamed if e.type == "response.output_text.delta" for lp in e.logprobs]
    assert [lp.token for lp in deltas] == [lp.token for lp in part.logprobs]


def test_no_logprobs_unless_included(client, model):
    response = client.responses.create(model=model, input=QUESTION, max_output_tokens=3, top_logprobs=3)
    assert response.output[0].content[0].logprobs == []

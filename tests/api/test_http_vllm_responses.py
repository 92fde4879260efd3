"""POST /v1/responses through the openai client on the shared server: the same answer as chat for the same
conversation, whole or as the Responses event stream, and 400 for what this server cannot do."""

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


def test_previous_response_id_is_refused(client, model):
    with pytest.raises(openai.BadRequestError, match="stores no responses"):
        client.responses.create(model=model, input="hi", previous_response_id="resp-1")

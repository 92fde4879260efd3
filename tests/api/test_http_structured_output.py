"""Structured output and logits constraints over HTTP through the official openai client: OpenAI's
`response_format` and `logit_bias`, vLLM's `structured_outputs`, legacy `guided_*`, `allowed_token_ids` and
`bad_words`, on /v1/chat/completions and /v1/completions; bad ones answer 400."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "pattern": "^[A-Z][a-z]{1,10}$"},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000},
        "capital": {"type": "boolean"},
    },
    "required": ["city", "population", "capital"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Describe Paris as JSON."}]
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def chat(client, model):
    def run(extra: dict | None = None, **kwargs) -> str:
        kwargs = {"model": model, "messages": MESSAGES, "max_tokens": 200, "temperature": 0, **kwargs}
        return client.chat.completions.create(extra_body=extra, **kwargs).choices[0].message.content

    return run


@pytest.fixture(scope="module")
def complete(client, model):
    def run(extra: dict | None = None, **kwargs) -> str:
        kwargs = {"model": model, "prompt": "The answer is", "max_tokens": 60, "temperature": 0, **kwargs}
        return client.completions.create(extra_body=extra, **kwargs).choices[0].text

    return run


def test_json_schema_response_parses_and_validates(chat):
    jsonschema.validate(json.loads(chat(response_format=JSON_SCHEMA_FORMAT)), SCHEMA)


def test_sampled_json_schema_response_validates_too(chat):
    for seed in range(3):
        jsonschema.validate(json.loads(chat(response_format=JSON_SCHEMA_FORMAT, temperature=1.0, seed=seed)), SCHEMA)


def test_json_object_response_is_a_json_object(complete):
    # Free-form JSON from random weights may not close within max_tokens; this prompt's greedy answer does.
    assert isinstance(json.loads(complete({"response_format": {"type": "json_object"}}, prompt="Hello, world!")), dict)


def test_choice_output_is_one_of_the_choices(complete, chat):
    choices = ["positive", "negative", "neutral"]
    assert complete({"structured_outputs": {"choice": choices}}) in choices
    assert chat({"guided_choice": choices}) in choices


def test_regex_output_matches(complete):
    assert re.fullmatch(r"\d{3}-[a-z]{2,4}", complete({"structured_outputs": {"regex": r"\d{3}-[a-z]{2,4}"}}))
    assert re.fullmatch(r"(yes|no)!", complete({"guided_regex": r"(yes|no)!"}))


def test_grammar_output_matches(complete):
    grammar = 'root ::= "[" num ("," num)* "]"\nnum ::= [1-9] [0-9]?'
    text = complete({"guided_grammar": grammar})
    assert re.fullmatch(r"\[[1-9][0-9]?(,[1-9][0-9]?)*\]", text)


def test_guided_json_on_completions(complete):
    jsonschema.validate(json.loads(complete({"guided_json": SCHEMA}, max_tokens=200)), SCHEMA)


def test_text_response_format_is_unconstrained(chat):
    assert chat(response_format={"type": "text"}, max_tokens=8) == chat(max_tokens=8)


def test_constrained_and_unconstrained_requests_batched_together(chat, complete):
    """Concurrent requests share steps: each constrained one still validates, the free ones are unchanged."""
    free_alone = complete(max_tokens=16, extra={"ignore_eos": True})
    with ThreadPoolExecutor(8) as pool:
        constrained = [pool.submit(chat, response_format=JSON_SCHEMA_FORMAT) for _ in range(4)]
        free = [pool.submit(complete, max_tokens=16, extra={"ignore_eos": True}) for _ in range(4)]
        for f in constrained:
            jsonschema.validate(json.loads(f.result()), SCHEMA)
        assert [f.result() for f in free] == [free_alone] * 4


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}, "json"),
    ({"structured_outputs": {"regex": "[a-"}}, "regex"),
    ({"guided_grammar": 'root ::= "a'}, "grammar"),
    ({"guided_json": "{not json"}, "json"),
    ({"structured_outputs": {"choice": []}}, "choice"),
])
def test_invalid_schema_regex_or_grammar_is_a_400(complete, extra, param):
    with pytest.raises(openai.BadRequestError, match=f"invalid structured output {param}"):
        complete(extra)


@pytest.mark.parametrize("extra", [
    {"response_format": {"type": "json_object"}, "guided_regex": "a+"},
    {"structured_outputs": {"regex": "a+", "choice": ["a"]}},
    {"guided_choice": ["a"], "guided_regex": "a+"},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "no schema"}}},
])
def test_conflicting_or_incomplete_structured_output_fields_are_a_400(complete, extra):
    with pytest.raises(openai.BadRequestError):
        complete(extra)


def test_logit_bias_of_100_forces_the_token(complete, client, model, http):
    token = http.post("/tokenize", json={"prompt": " fox"}).json()["tokens"][-1]
    out = client.completions.create(model=model, prompt="The answer is", max_tokens=5, temperature=0,
                                    logit_bias={str(token): 100})
    assert http.post("/tokenize", json={"prompt": out.choices[0].text}).json()["tokens"] == [token] * 5


def test_allowed_token_ids_and_bad_words_are_honoured(complete, http):
    tokenize = lambda text: http.post("/tokenize", json={"prompt": text}).json()["tokens"]  # noqa: E731
    allowed = tokenize(" is a and is")  # one token each, with or without their leading space
    words = complete({"allowed_token_ids": allowed, "ignore_eos": True}, max_tokens=10).split()
    assert words and set(words) <= {"is", "a", "and"}
    favourite = max(set(words), key=words.count)
    rest = complete({"allowed_token_ids": allowed, "bad_words": [favourite], "ignore_eos": True}, max_tokens=10)
    assert rest.split() and set(rest.split()) <= {"is", "a", "and"} - {favourite}


@pytest.mark.parametrize("extra, param", [
    ({"logit_bias": {"99999999": 5}}, "logit_bias"),
    ({"logit_bias": {"3": 101}}, "logit_bias"),
    ({"logit_bias": {"dog": 1}}, "logit_bias"),
    ({"allowed_token_ids": [99999999]}, "allowed_token_ids"),
    ({"bad_words": [" "]}, "bad_words"),
])
def test_bad_logits_constraints_are_a_400(complete, extra, param):
    with pytest.raises(openai.BadRequestError, match=param):
        complete(extra)

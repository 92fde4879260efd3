"""Tenant isolation and what clients see on the wire: `cache_salt` keeps prompts of different salts from sharing
prefix-cache blocks (and one salt shares as before), streamed JSON escapes the characters line-splitting clients
break on, and the OpenAPI schema states the statuses and limits the server really answers with."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from loomserve.api.limits import ServerLimits

BLOCK = 16  # tokens per KV block (the default --block-size)


def unique_prompt() -> str:
    """A prompt of several blocks that no other test sends, so nothing of it is cached yet."""
    return f"{uuid.uuid4().hex} " + "the quick brown fox jumps over the lazy dog " * 8


def cached_tokens(http: httpx.Client, route: str, body: dict) -> int:
    response = http.post(route, json={"max_tokens": 1, **body})
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


@pytest.mark.parametrize("route, shape", [
    ("/v1/completions", lambda text: {"prompt": text}),
    ("/v1/chat/completions", lambda text: {"messages": [{"role": "user", "content": text}]}),
])
def test_two_salts_share_no_cached_block_and_one_salt_shares_as_before(http, model, route, shape):
    body = {"model": model, **shape(unique_prompt())}
    assert cached_tokens(http, route, {**body, "cache_salt": "tenant-1"}) == 0
    assert cached_tokens(http, route, {**body, "cache_salt": "tenant-2"}) == 0
    assert cached_tokens(http, route, body) == 0  # no salt is a tenant of its own
    assert cached_tokens(http, route, {**body, "cache_salt": "tenant-1"}) >= 2 * BLOCK


def test_an_empty_cache_salt_is_a_400(http, model):
    response = http.post("/v1/completions", json={"model": model, "prompt": "hi", "cache_salt": ""})
    assert response.status_code == 400 and response.json()["error"]["param"] == "cache_salt"


def test_streamed_json_escapes_unicode_line_breaks(http, model):
    text = "one\u2028two\u2029three\u0085four"
    body = {"model": model, "prompt": text, "echo": True, "max_tokens": 1, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        raw = response.read().decode()
    events = [line for line in raw.split("\n") if line.startswith("data: {")]
    assert not any(c in raw for c in "\u2028\u2029\u0085")
    assert json.loads(events[0][len("data: "):])["choices"][0]["text"].startswith(text)
    assert all(len(line.splitlines()) == 1 for line in events)  # str.splitlines splits at each of the three


def test_the_openapi_schema_states_real_statuses_and_the_limits(http, model):
    schema = http.get("/openapi.json").json()
    responses = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "422" not in json.dumps(schema["paths"])
    assert {"400", "413", "429"} <= set(responses)
    assert responses["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert f"`--max-stop-strings`: {ServerLimits().max_stop_strings}" in schema["info"]["description"]
    bad = http.post("/v1/chat/completions", json={"model": model, "messages": "not a list"})
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}

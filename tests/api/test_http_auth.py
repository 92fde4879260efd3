"""--api-key: every route but /health, /metrics and /version needs `Authorization: Bearer <key>`."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

KEY = "sesame-0123"


@pytest.fixture(scope="module")
def keyed(start_server) -> Iterator:
    with start_server("--api-key", KEY) as server:
        yield server


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
     ("POST", "/tokenize"), ("POST", "/detokenize")],
)
def test_api_routes_need_the_key(keyed, method, path):
    with keyed.http() as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = http.request(method, path, headers=headers, json={})
            assert response.status_code == 401
            assert response.json()["error"]["type"] == "AuthenticationError"


def test_open_routes(keyed):
    with keyed.http() as http:
        assert http.get("/health").status_code == 200
        assert http.get("/version").status_code == 200
        assert http.get("/metrics").status_code == 200


def test_openai_client_with_and_without_the_key(keyed):
    with pytest.raises(openai.AuthenticationError):
        keyed.client("wrong").models.list()
    client = keyed.client(KEY)
    assert [m.id for m in client.models.list()] == [keyed.model]
    out = client.chat.completions.create(
        model=keyed.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
    )
    assert out.choices[0].message.content is not None

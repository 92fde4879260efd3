"""When the engine process dies the server stays up and answers 503, with OpenAI's error shape."""

from __future__ import annotations

import os
import signal
import time

import pytest


@pytest.fixture(scope="module")
def orphaned(start_server):
    """A server whose engine process has been killed."""
    with start_server() as server:
        os.kill(server.engine_pid(), signal.SIGKILL)
        yield server


def test_dead_engine_gives_503(orphaned):
    with orphaned.http() as http:
        deadline = time.monotonic() + 10
        while (health := http.get("/health")).status_code == 200:
            assert time.monotonic() < deadline, "/health stayed 200 with the engine dead"
            time.sleep(0.1)
        assert health.status_code == 503
        body = {"model": orphaned.model, "max_tokens": 2}
        for path, extra in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
                            ("/v1/completions", {"prompt": "Hi", "stream": True})):
            response = http.post(path, json={**body, **extra})
            assert response.status_code == 503
            assert response.json()["error"]["type"] == "ServiceUnavailableError"
        assert http.get("/v1/models").status_code == 200  # the front end itself still answers

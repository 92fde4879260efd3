"""A client that leaves mid-request aborts it: the engine frees its KV blocks and the server keeps serving."""

from __future__ import annotations

import time

import httpx
import pytest

LONG = {"prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True}
LENGTHS = ("loomserve:request_success_total", {"finished_reason": "length"})


def wait_until_idle(server, http) -> int:
    """Send short requests until the engine reports nothing running; how many were sent.

    The engine reports its state with each step's outputs, so a short request is what brings news."""
    deadline = time.monotonic() + 20
    sent = 0
    while time.monotonic() < deadline:
        http.post("/v1/completions", json={"model": server.model, "prompt": "a", "max_tokens": 2}).raise_for_status()
        sent += 1
        if server.metric("loomserve:num_requests_running") == 0:
            return sent
        time.sleep(0.1)
    raise AssertionError("the engine still runs a request whose client left")


def assert_aborted_and_freed(server, http, lengths_before: float) -> None:
    sent = wait_until_idle(server, http)
    assert server.metric("loomserve:num_requests_waiting") == 0
    assert server.metric("loomserve:kv_cache_usage_perc") == 0
    # only the short requests finished by length: the long one was aborted, not run to its end
    assert server.metric(LENGTHS[0], **LENGTHS[1]) == lengths_before + sent


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_stream_disconnect_frees_blocks(server, http, route):
    body = {"model": server.model, "stream": True, "n": 2, **LONG}
    if route == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": body.pop("prompt")}]
    before = server.metric(LENGTHS[0], **LENGTHS[1])
    with httpx.Client(base_url=server.url, timeout=30) as leaving:
        with leaving.stream("POST", route, json=body) as response:
            events = (line for line in response.iter_lines() if line.startswith("data: "))
            assert next(events) and next(events) and next(events)
        # leaving the block closes the connection mid-stream
    assert_aborted_and_freed(server, http, before)


def test_non_streaming_disconnect_frees_blocks(server, http):
    before = server.metric(LENGTHS[0], **LENGTHS[1])
    with httpx.Client(base_url=server.url, timeout=0.5) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.post("/v1/completions", json={"model": server.model, "n": 4, **LONG})
    assert_aborted_and_freed(server, http, before)

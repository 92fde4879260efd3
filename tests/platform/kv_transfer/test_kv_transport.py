"""Blocks between instances over TCP: a held request's blocks are served once, acknowledged and reported sent; a
request not held (never, dropped, or already fetched) is refused with why, never answered with whatever the blocks
hold now."""

from __future__ import annotations

import time

import pytest
import torch

from loomserve.platform.kv_transfer.transport import BlockServer, fetch_blocks


@pytest.fixture
def server():
    blocks = torch.arange(10 * 3, dtype=torch.float32).view(10, 3)  # block id -> its (tiny) contents
    s = BlockServer("127.0.0.1", 0, lambda ids: blocks[ids])
    yield s
    s.close()


def _sent(server: BlockServer) -> list[str]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        sent = server.take_sent()
        if sent:
            return sent
        time.sleep(0.01)
    return []


def test_a_held_requests_blocks_are_served_once_and_reported_sent(server):
    server.hold({"r": [4, 7, 2]}, [])
    got = fetch_blocks("127.0.0.1", server.port, "r", [7, 2], timeout_s=5)
    assert got.tolist() == [[21.0, 22.0, 23.0], [6.0, 7.0, 8.0]]
    assert _sent(server) == ["r"]
    with pytest.raises(ConnectionError, match="holds no such KV blocks"):
        fetch_blocks("127.0.0.1", server.port, "r", [7, 2], timeout_s=5)


@pytest.mark.parametrize("ask", [("r", [4]), ("dropped", [1]), ("never", [0])])
def test_blocks_not_held_for_the_request_are_refused(server, ask):
    server.hold({"r": [1, 2], "dropped": [1]}, [])
    server.hold({}, ["dropped"])
    with pytest.raises(ConnectionError, match="holds no such KV blocks"):
        fetch_blocks("127.0.0.1", server.port, *ask, timeout_s=5)
    assert server.take_sent() == []


def test_fp8_blocks_cross_bit_for_bit():
    blocks = torch.randn(4, 2, 3).to(torch.float8_e5m2)  # an fp8 KV cache's blocks
    server = BlockServer("127.0.0.1", 0, lambda ids: blocks[ids])
    try:
        server.hold({"r": [1, 3]}, [])
        got = fetch_blocks("127.0.0.1", server.port, "r", [3, 1], timeout_s=5)
    finally:
        server.close()
    assert got.dtype == torch.float8_e5m2
    assert torch.equal(got.view(torch.uint8), blocks[[3, 1]].view(torch.uint8))

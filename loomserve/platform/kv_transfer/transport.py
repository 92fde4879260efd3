"""KV blocks between instances over TCP (`TcpConnector`: loopback on one host, the network across hosts).

A producer's runner serves the blocks it holds for finished prefills (`BlockServer`, a thread); a consumer's runner
asks for them by the producer's request id and block ids (`fetch_blocks`) and gets them in one message, every layer
at once. A request the producer no longer holds (timed out, or never there) is answered with why, never with
whatever the blocks hold now. Messages are length-prefixed `wire.py` values; tensors travel as raw bytes.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import struct
import threading
from collections.abc import Callable
from typing import Any

import torch

from loomserve.platform import wire
from loomserve.platform.kv_transfer.copier import device_index, gather_blocks

logger = logging.getLogger(__name__)

_LENGTH = struct.Struct("!Q")


def _send(sock: socket.socket, value: Any) -> None:
    payload = wire.encode(value)
    sock.sendall(_LENGTH.pack(len(payload)) + payload)


def _recv(sock: socket.socket) -> Any:
    (length,) = _LENGTH.unpack(_recv_exactly(sock, _LENGTH.size))
    return wire.decode(_recv_exactly(sock, length))


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise ConnectionError("the peer closed the connection")
        got += k
    return bytes(buf)


class BlockServer:
    """Serves held requests' blocks; `read(block_ids)` gathers them on the host [n, layers, 2, block, heads, dim]."""

    def __init__(self, host: str, port: int, read: Callable[[list[int]], torch.Tensor]) -> None:
        self.read = read
        self.lock = threading.Lock()
        self.held: dict[str, list[int]] = {}  # request id -> block ids the scheduler keeps for it
        self.sent: list[str] = []  # served since the last `take_sent`
        server = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                server.serve_one(self.request)

        self.tcp = socketserver.ThreadingTCPServer((host, port), Handler, bind_and_activate=False)
        self.tcp.allow_reuse_address = True
        self.tcp.daemon_threads = True
        self.tcp.server_bind()
        self.tcp.server_activate()
        self.port = self.tcp.server_address[1]
        threading.Thread(target=self.tcp.serve_forever, name="loomserve-kv-server", daemon=True).start()

    def hold(self, held: dict[str, list[int]], dropped: list[str]) -> None:
        with self.lock:
            self.held.update(held)
            for request_id in dropped:
                self.held.pop(request_id, None)

    def take_sent(self) -> list[str]:
        with self.lock:
            sent, self.sent = self.sent, []
        return sent

    def serve_one(self, sock: socket.socket) -> None:
        try:
            ask = _recv(sock)
            request_id, block_ids = ask["request_id"], ask["block_ids"]
            with self.lock:
                held = self.held.get(request_id)
            if held is None or not set(block_ids) <= set(held):
                _send(sock, {"error": f"request {request_id} holds no such KV blocks here (freed or never held)"})
                return
            _send(sock, {"blocks": wire.tensor_to_wire(self.read(block_ids))})
            _recv(sock)  # the consumer's acknowledgement: the blocks are its now
            with self.lock:
                self.held.pop(request_id, None)
                self.sent.append(request_id)
        except (ConnectionError, OSError) as e:
            logger.warning("a KV transfer to %s failed: %s", sock.getpeername() if sock else "?", e)

    def close(self) -> None:
        self.tcp.shutdown()
        self.tcp.server_close()


def fetch_blocks(host: str, port: int, request_id: str, block_ids: list[int], timeout_s: float) -> torch.Tensor:
    """The producer's blocks [n, layers, 2, block, heads, dim] of `request_id`; raises ConnectionError saying why
    when they cannot be had."""
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        _send(sock, {"request_id": request_id, "block_ids": block_ids})
        answer = _recv(sock)
        if "error" in answer:
            raise ConnectionError(answer["error"])
        blocks = wire.tensor_from_wire(answer["blocks"])
        _send(sock, {"ack": True})
        return blocks


class TcpTransport:
    """`TcpConnector`: a producer serves its held blocks from a `BlockServer` until a consumer fetched them."""

    def __init__(self, host: str, port: int, serves: bool) -> None:
        self.host, self.port, self.serves = host, port, serves
        self.caches: list[torch.Tensor] = []
        self.server: BlockServer | None = None

    def register_kv_caches(self, kv_caches: list[torch.Tensor]) -> None:
        self.caches = kv_caches
        if self.serves:
            self.server = BlockServer(self.host, self.port, self._read)
            logger.info("serving KV blocks to decode instances at %s:%d", self.host, self.server.port)

    def _read(self, block_ids: list[int]) -> torch.Tensor:
        device = self.caches[0].device
        return gather_blocks(self.caches, device_index(block_ids, device)).cpu()

    def hold(self, held: dict[str, dict], dropped: list[str]) -> None:
        """Serve each held request's `remote_block_ids` from now on, no longer the dropped requests'."""
        self.server.hold({request_id: params["remote_block_ids"] for request_id, params in held.items()}, dropped)

    def take_sent(self) -> list[str]:
        return self.server.take_sent() if self.server is not None else []

    def fetch(self, load: dict, timeout_s: float) -> torch.Tensor:
        return fetch_blocks(load["remote_host"], load["remote_port"], load["remote_request_id"],
                            load["remote_block_ids"], timeout_s)

"""The server's processes live and die together, and /health tells the truth: an engine stopped with SIGSTOP turns
/health 503 within 5 s and 200 again once resumed; `kill -9` of the API server leaves no engine process and no IPC
folder behind; an engine that cannot start says why, and leaves no IPC folder either."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from loomserve.testing.probes import process_exists
from loomserve.testing.server import Server

DEADLINE_S = 5.0


def ipc_folders(tmp: Path) -> list[Path]:
    return list(tmp.glob("loomserve-*"))


def within(seconds: float, condition: Callable[[], bool]) -> bool:
    """Whether `condition()` holds at some point within `seconds` (asked every 0.1 s)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def health(server: Server) -> int:
    return httpx.get(f"{server.url}/health", timeout=2, trust_env=False).status_code


@pytest.fixture(scope="module")
def own_tmp_server(qwen2_checkpoint, tmp_path_factory) -> Iterator[tuple[Server, Path]]:
    """A server whose temporary folder is its own, so the IPC folders found there are its; the last test of this
    module kills it."""
    tmp = tmp_path_factory.mktemp("own-tmp")
    server = Server(qwen2_checkpoint, ["--kv-cache-memory", "16MiB"], tmp / "server.log",
                    env={**os.environ, "TMPDIR": str(tmp)})
    with server.running():
        yield server, tmp


def test_health_is_503_while_the_engine_is_stopped_and_200_once_it_resumes(own_tmp_server):
    server, _ = own_tmp_server
    engine = server.engine_pid()
    os.kill(engine, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        assert within(DEADLINE_S, lambda: health(server) == 503)
        assert time.monotonic() - stopped < DEADLINE_S
        assert "has not answered" in httpx.get(f"{server.url}/health").json()["error"]["message"]
    finally:
        os.kill(engine, signal.SIGCONT)
    assert within(DEADLINE_S, lambda: health(server) == 200)
    with server.http() as http:
        body = {"model": server.model, "prompt": "hi", "max_tokens": 2}
        assert http.post("/v1/completions", json=body).status_code == 200


def test_kill_9_of_the_api_server_takes_the_engine_and_its_ipc_folder_along(own_tmp_server):
    server, tmp = own_tmp_server
    engine = server.engine_pid()
    assert ipc_folders(tmp)
    server.process.kill()
    assert within(DEADLINE_S, lambda: not process_exists(engine))
    assert within(DEADLINE_S, lambda: not ipc_folders(tmp))


def test_an_engine_that_cannot_start_says_why_and_leaves_no_ipc_folder(qwen2_checkpoint, tmp_path):
    flags = ["--num-gpu-blocks-override", "10", "--max-model-len", "512"]
    server = Server(qwen2_checkpoint, flags, tmp_path / "server.log", env={**os.environ, "TMPDIR": str(tmp_path)})
    with pytest.raises(RuntimeError, match="server exited"):
        server.start()
    log = server.log_tail()
    assert "max_model_len 512 is larger than the 160 tokens the KV cache can hold" in log
    assert "no current event loop" not in log
    assert not ipc_folders(tmp_path)

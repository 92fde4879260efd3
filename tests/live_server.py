"""A real loomserve server for the HTTP tests: `python -m loomserve.api.cli serve` in a subprocess on 127.0.0.1,
healthy before it is handed over and stopped (SIGINT, then kill) afterwards."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from loomserve.api.cli import DEMO_NAME

if TYPE_CHECKING:  # the GPU image has no openai client; only the HTTP tests need it
    import openai

MODEL = "tiny-qwen2"
STARTUP_TIMEOUT_S = 120.0


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    model: str = MODEL

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def metric(self, name: str, **labels: str) -> float:
        """One sample of /metrics (labels not given are ignored)."""
        return metric_value(httpx.get(f"{self.url}/metrics").text, name, **labels)

    def engine_pid(self) -> int:
        """The EngineCore process: the server's child started by multiprocessing's spawn (from any thread)."""
        tasks = Path(f"/proc/{self.process.pid}/task").glob("*/children")
        children = [pid for task in tasks for pid in task.read_text().split()]
        for pid in children:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return int(pid)
        raise AssertionError(f"no engine process among the server's children {children}")


def metric_value(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} is not in /metrics")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(server: Server) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited with {server.process.returncode}:\n{server.log.read_text()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not become healthy in {STARTUP_TIMEOUT_S} s:\n{server.log.read_text()}")


@contextmanager
def running_server(checkpoint: str | None, log_dir: Path, *flags: str) -> Iterator[Server]:
    """A server of `checkpoint` served as MODEL; None: the embedded default (`loomserve serve` with no MODEL)."""
    port = _free_port()
    log = log_dir / f"server-{port}.log"
    model_flags = [checkpoint, "--served-model-name", MODEL] if checkpoint is not None else []
    command = [
        sys.executable, "-m", "loomserve.api.cli", "serve", *model_flags, "--host", "127.0.0.1",
        "--port", str(port), "--kv-cache-memory", "16MiB", *flags,
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process, log, MODEL if checkpoint is not None else DEMO_NAME)
    try:
        _wait_healthy(server)
        yield server
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

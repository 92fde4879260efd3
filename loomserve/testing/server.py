"""A live `loomserve serve` in a subprocess, for the HTTP tests and benchmarks: started on a free loopback port,
polled on /health until it answers, and stopped (with everything it started) afterwards."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from loomserve.demo import DEMO_NAME
from loomserve.platform.process_name import ENGINE_PREFIX

if TYPE_CHECKING:  # the GPU image has no openai client; only the HTTP tests need it
    import openai

HOST = "127.0.0.1"
MODEL = "tiny-qwen2"  # the name `running_server` serves a checkpoint under
STARTUP_TIMEOUT_S = 240  # a four-engine server on two loaded cores took 141 s


def free_port() -> int:
    """A TCP port on HOST that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """`loomserve serve [CHECKPOINT] --host HOST --port PORT FLAGS...` in this Python, its output in `log_path`;
    `checkpoint` None serves the embedded default; `env` None inherits this process's environment."""

    checkpoint: str | None
    flags: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    port: int = field(default_factory=free_port)
    subcommand: str = "serve"  # or "proxy" (its flags name the instances behind it; `checkpoint` None)
    cwd: str | None = None  # where it runs (`-m` imports from there first); None: here
    program: list[str] = field(default_factory=lambda: [sys.executable, "-m", "loomserve.api.cli"])  # or a venv's
    process: subprocess.Popen | None = None

    @property
    def command(self) -> list[str]:
        """The command line the server runs with."""
        model = [self.checkpoint] if self.checkpoint is not None else []
        return [*self.program, self.subcommand, *model, "--host", HOST, "--port",
                str(self.port), *self.flags]

    @property
    def url(self) -> str:
        """Where the server's HTTP API answers."""
        return f"http://{HOST}:{self.port}"

    @property
    def model(self) -> str:
        """The model name clients send: --served-model-name, else the checkpoint, else the demo's name."""
        if "--served-model-name" in self.flags:
            return self.flags[self.flags.index("--served-model-name") + 1]
        return self.checkpoint.rstrip("/") if self.checkpoint is not None else DEMO_NAME

    @contextmanager
    def running(self, timeout: float = STARTUP_TIMEOUT_S) -> Iterator[float]:
        """Started and healthy inside the block (yields the seconds start-up took), stopped on leaving it."""
        try:
            yield self.start(timeout)
        finally:
            self.stop()

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> float:
        """Start and wait for /health; the seconds it took."""
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, env=self.env, cwd=self.cwd)
        while time.perf_counter() - t0 < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            if self._healthy():
                return time.perf_counter() - t0
            time.sleep(0.2)
        raise RuntimeError(f"server not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def _healthy(self) -> bool:
        """Whether /health answers 200 right now."""
        try:
            return httpx.get(f"{self.url}/health", timeout=2.0, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        """SIGINT (uvicorn's graceful shutdown), then SIGTERM and SIGKILL to the process group it leads."""
        if self.process is None:
            return
        for sig, wait_s in ((signal.SIGINT, 30.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            if self.process.poll() is not None:
                break
            if sig == signal.SIGINT:
                self.process.send_signal(sig)  # the server stops its engine itself
            else:
                self._signal_group(sig)
            try:
                self.process.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
        self._signal_group(signal.SIGKILL)  # whatever the server left behind in its session (its engine process)

    def _signal_group(self, sig: signal.Signals) -> None:
        """Send `sig` to the server's process group, if any of it is left."""
        assert self.process is not None
        try:
            os.killpg(self.process.pid, sig)  # the group `start` made the server lead (start_new_session)
        except ProcessLookupError:
            pass

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's log, for error messages."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def metric(self, name: str, **labels: str) -> float:
        """One sample of /metrics (labels not given are ignored)."""
        return metric_value(httpx.get(f"{self.url}/metrics").text, name, **labels)

    def engine_pid(self) -> int:
        """An EngineCore process: the server's child named as one (process_name.py), whichever thread started it and
        however many API processes (also its children) there are."""
        assert self.process is not None
        tasks = Path(f"/proc/{self.process.pid}/task").glob("*/children")
        children = [pid for task in tasks for pid in task.read_text().split()]
        for pid in children:
            if Path(f"/proc/{pid}/comm").read_text().startswith(ENGINE_PREFIX):
                return int(pid)
        raise AssertionError(f"no engine process among the server's children {children}")


def metric_value(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} is not in /metrics")


@contextmanager
def running_server(checkpoint: str | None, log_dir: Path, *flags: str) -> Iterator[Server]:
    """A healthy server of `checkpoint` served as MODEL with a small KV cache (the HTTP tests' default); None: the
    embedded default under its own name."""
    name = ["--served-model-name", MODEL] if checkpoint is not None else []
    port = free_port()
    server = Server(checkpoint, [*name, "--kv-cache-memory", "16MiB", *flags], log_dir / f"server-{port}.log",
                    port=port)
    with server.running():
        yield server

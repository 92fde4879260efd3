"""`loomserve serve` as a subprocess for the HTTP benchmarks: started on a free loopback port, polled on
/health until it answers, and stopped (with everything it started) when the benchmark is done."""

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

import httpx

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on HOST that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """`loomserve serve MODEL --host HOST --port PORT FLAGS...` in this Python, its output in `log_path`;
    `env` None inherits this process's environment."""

    model: str
    flags: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def command(self) -> list[str]:
        """The command line the server runs with."""
        return [sys.executable, "-m", "loomserve.api.cli", "serve", self.model, "--host", HOST,
                "--port", str(self.port), *self.flags]

    @property
    def base_url(self) -> str:
        """Where the server's HTTP API answers."""
        return f"http://{HOST}:{self.port}"

    @contextmanager
    def running(self, timeout: float) -> Iterator[float]:
        """Started and healthy inside the block (yields the seconds start-up took), stopped on leaving it."""
        try:
            yield self.start(timeout)
        finally:
            self.stop()

    def start(self, timeout: float) -> float:
        """Start and wait for /health; the seconds it took."""
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, env=self.env)
        while time.perf_counter() - t0 < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            if self._healthy():
                return time.perf_counter() - t0
            time.sleep(0.5)
        raise RuntimeError(f"server not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def _healthy(self) -> bool:
        """Whether /health answers 200 right now."""
        try:
            return httpx.get(f"{self.base_url}/health", timeout=2.0, trust_env=False).status_code == 200
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
            os.killpg(self.process.pid, sig)  # the group this script started (start_new_session)
        except ProcessLookupError:
            pass

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's log, for error messages."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

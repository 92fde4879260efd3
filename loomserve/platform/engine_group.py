"""Starting and stopping the EngineCore processes of one served model (N with data parallelism), and what a front end
in another process needs to reach them (`EngineAddresses`).

The process that starts the engines owns them: it learns each one's Ready (or why it failed) over a pipe of its own,
stops them with `Shutdown`, and takes their IPC folder away. Front ends (this process's AsyncLLM, or API server
processes) only connect to their sockets.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import zmq

from loomserve.platform.config import EngineArgs
from loomserve.platform.engine import run_engine_core
from loomserve.platform.messages import EngineFailed, Ready, Shutdown, pack, unpack
from loomserve.platform.process_name import ENGINE_PREFIX, run_named
from loomserve.platform.threads import set_child_env

_STARTUP_TIMEOUT_S = 900.0
_STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class EngineAddresses:
    """Where a front end reaches each engine of a model, and the engines' pids (to tell a dead one)."""

    addresses: list[str]
    pids: list[int]

    def first_dead(self) -> int | None:
        """The index of an engine whose process has ended, if any."""
        return next((i for i, pid in enumerate(self.pids) if not pid_alive(pid)), None)


@dataclass(frozen=True)
class EngineLink:
    """A front end's place among the engines' clients: where they are, and which of `num_clients` it is."""

    addresses: EngineAddresses
    client_index: int = 0
    num_clients: int = 1


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, ended but not yet reaped by its parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


class EngineGroup:
    """The engine processes of one model, started now (`wait_ready` blocks until they have loaded it)."""

    def __init__(self, args: EngineArgs, num_engines: int) -> None:
        self.ipc_dir = tempfile.mkdtemp(prefix="loomserve-")
        set_child_env()  # the engines' OpenMP reads its wait policy when it starts
        self.engines = [_EngineProcess(args, f"ipc://{os.path.join(self.ipc_dir, f'engine-{i}')}", i)
                        for i in range(num_engines)]
        self.addresses = EngineAddresses([e.address for e in self.engines], [e.proc.pid for e in self.engines])

    def wait_ready(self) -> None:
        """Block until every engine has loaded its model; RuntimeError (after stopping them all) if one did not."""
        try:
            for engine in self.engines:
                engine.wait_ready()
        except BaseException:
            self.stop()
            raise

    def exit_message(self, index: int) -> str:
        return f"the engine process exited with code {self.engines[index].proc.exitcode}"

    def stop(self) -> None:
        """Ask every engine to stop (killing one that does not), then take the IPC folder away."""
        ctx = zmq.Context()
        try:
            for engine in self.engines:
                engine.ask_to_stop(ctx)
            for engine in self.engines:
                engine.join()
        finally:
            ctx.term()
            shutil.rmtree(self.ipc_dir, ignore_errors=True)


def spawn_reporting(target: Callable[..., None], args: tuple, name: str,
                    daemon: bool = True) -> tuple[BaseProcess, Connection]:
    """Start `target(*args, conn)` in a spawned process named `name` (its kernel name too, process_name.py); returns
    it and the end of `conn` its parent reads (a dead child reads as end of file). The child starts with Ctrl-C
    blocked (a signal mask survives exec), so a Ctrl-C to the process group while it is still importing is not a
    KeyboardInterrupt traceback; the child decides from then on. The resource tracker is started first: starting it
    unblocks SIGINT in this thread."""
    parent_end, child_end = multiprocessing.Pipe(duplex=False)
    proc = multiprocessing.get_context("spawn").Process(target=run_named, args=(target, *args, child_end), name=name,
                                                        daemon=daemon)
    resource_tracker.ensure_running()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        proc.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    child_end.close()
    return proc, parent_end


class _EngineProcess:
    def __init__(self, args: EngineArgs, address: str, index: int) -> None:
        self.address = address
        self.proc, self.started = spawn_reporting(run_engine_core, (args, address), f"{ENGINE_PREFIX}{index}")

    def wait_ready(self) -> None:
        """Block until the engine process has loaded the model (or died trying)."""
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.started.poll(0.5):
                try:
                    message = unpack(self.started.recv_bytes())
                except EOFError:
                    message = None
                if isinstance(message, Ready):
                    return
                if isinstance(message, EngineFailed):
                    raise RuntimeError(f"the engine failed to start:\n{message.traceback}")
            if not self.proc.is_alive():
                raise RuntimeError(f"the engine process exited with code {self.proc.exitcode} during start-up")
        raise RuntimeError("the engine did not start in time")

    def ask_to_stop(self, ctx: zmq.Context) -> None:
        if not self.proc.is_alive():
            return
        sock = ctx.socket(zmq.DEALER)
        sock.connect(self.address)
        sock.send(pack(Shutdown()), flags=zmq.NOBLOCK)
        sock.close(linger=500)  # delivered at once to a running engine; one still loading is terminated

    def join(self) -> None:
        self.proc.join(timeout=_STOP_TIMEOUT_S)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=_STOP_TIMEOUT_S)
        self.started.close()

"""Executors: what stands between EngineCore and its runner(s).

EngineCore asks the executor how many KV blocks fit (`measure_kv_blocks`), has it allocate them (`init_kv_cache`),
then hands it steps as values (`launch`, later `collect`) and feature calls (`call`, answered by a future). The
in-process executor holds the runner itself; the multi-process one runs it in a worker process and sends steps
and results over a pipe in their wire form (`wire.py`), in order, so a launched step can be collected after the
next one is launched, as in process.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import multiprocessing
import threading
import traceback
from typing import Any, Protocol

from loomserve.platform.config import EngineConfig
from loomserve.platform.step import ScheduledStep, StepResult

logger = logging.getLogger(__name__)

_CALL_POLL_S = 0.005  # how often a worker with calls under way checks on them
_DIED = RuntimeError("the runner process died")


class Executor(Protocol):
    def measure_kv_blocks(self) -> int: ...

    def init_kv_cache(self, num_blocks: int) -> None: ...

    def launch(self, step: ScheduledStep) -> Any:
        """Start a step; returns the handle `collect` takes."""

    def collect(self, handle: Any) -> StepResult: ...

    def call(self, feature: str, method: str, *args: Any) -> concurrent.futures.Future:
        """A call to a feature's runner hook; the future fails with ValueError when it cannot be done."""

    def shutdown(self) -> None: ...


def create_executor(config: EngineConfig) -> Executor:
    if config.parallel_config.distributed_executor_backend == "mp":
        return MultiprocExecutor(config)
    return InProcExecutor(config)


def _as_future(fn: Any, *args: Any) -> concurrent.futures.Future:
    """fn(*args) as a future: its own when it returns one, else done with its value or its ValueError."""
    try:
        value = fn(*args)
    except ValueError as e:
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_exception(e)
        return future
    if isinstance(value, concurrent.futures.Future):
        return value
    future = concurrent.futures.Future()
    future.set_result(value)
    return future


class InProcExecutor:
    def __init__(self, config: EngineConfig) -> None:
        from loomserve.platform.runner import ModelRunner

        self.runner = ModelRunner(config)

    def measure_kv_blocks(self) -> int:
        return self.runner.measure_kv_blocks()

    def init_kv_cache(self, num_blocks: int) -> None:
        self.runner.init_kv_cache(num_blocks)

    def launch(self, step: ScheduledStep) -> Any:
        return self.runner.launch(step)

    def collect(self, handle: Any) -> StepResult:
        return self.runner.collect(handle)

    def call(self, feature: str, method: str, *args: Any) -> concurrent.futures.Future:
        return _as_future(self.runner.call, feature, method, *args)

    def shutdown(self) -> None:
        pass


class MultiprocExecutor:
    """One worker process running the runner; a reader thread hands its replies to the waiting futures."""

    def __init__(self, config: EngineConfig) -> None:
        ctx = multiprocessing.get_context("spawn")  # a forked CUDA context is unusable; spawn is also what CI tests
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(config, child), name="loomserve-runner", daemon=True)
        self.process.start()
        child.close()
        self.ids = itertools.count()
        self.pending: dict[int, concurrent.futures.Future] = {}
        self.dead = False  # the worker is gone: every call fails at once
        self.lock = threading.Lock()  # one sender at a time; the reader thread only receives
        self.reader = threading.Thread(target=self._read, name="loomserve-runner-reader", daemon=True)
        self.reader.start()

    def _send(self, kind: str, payload: Any = None) -> concurrent.futures.Future:
        from loomserve.platform import wire

        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.lock:
            if self.dead:
                future.set_exception(_DIED)
                return future
            message_id = next(self.ids)
            self.pending[message_id] = future
            try:
                self.conn.send_bytes(wire.encode([kind, message_id, payload]))
            except OSError:  # the reader fails this future too, once it sees the pipe closed
                pass
        return future

    def _read(self) -> None:
        from loomserve.platform import wire

        while True:
            try:
                kind, message_id, payload = wire.decode(self.conn.recv_bytes())
            except (EOFError, OSError):
                break
            future = self.pending.pop(message_id)
            if kind == "error":
                future.set_exception(ValueError(payload))
            elif kind == "crash":
                future.set_exception(RuntimeError(f"the runner process failed:\n{payload}"))
            else:
                future.set_result(payload)
        with self.lock:
            self.dead = True
            for future in self.pending.values():
                future.set_exception(_DIED)
            self.pending.clear()

    def measure_kv_blocks(self) -> int:
        return self._send("measure_kv_blocks").result()

    def init_kv_cache(self, num_blocks: int) -> None:
        self._send("init_kv_cache", num_blocks).result()

    def launch(self, step: ScheduledStep) -> Any:
        from loomserve.platform import wire

        return self._send("launch", wire.encode(step))

    def collect(self, handle: Any) -> StepResult:
        from loomserve.platform import wire

        handle.result()  # launched (or raised)
        return wire.decode(self._send("collect").result(), StepResult)

    def call(self, feature: str, method: str, *args: Any) -> concurrent.futures.Future:
        return self._send("call", [feature, method, list(args)])

    def shutdown(self) -> None:
        if self.process.is_alive():
            self._send("shutdown")
            self.process.join(10)
            if self.process.is_alive():
                self.process.kill()
        self.conn.close()


def _worker_main(config: EngineConfig, conn: Any) -> None:
    """The runner process: messages are handled in order; calls whose answer comes later (a future) are answered
    once done."""
    from loomserve.platform import wire
    from loomserve.platform.runner import ModelRunner

    runner = None
    in_flight: list[Any] = []  # launched steps, oldest first
    calls: list[tuple[int, concurrent.futures.Future]] = []
    while True:
        if calls and not conn.poll(_CALL_POLL_S):
            calls = _answer_done(conn, calls)
            continue
        kind, message_id, payload = wire.decode(conn.recv_bytes())
        try:
            if kind == "shutdown":
                conn.send_bytes(wire.encode(["ok", message_id, None]))
                return
            if runner is None:
                runner = ModelRunner(config)
            reply: Any = None
            if kind == "measure_kv_blocks":
                reply = runner.measure_kv_blocks()
            elif kind == "init_kv_cache":
                runner.init_kv_cache(payload)
            elif kind == "launch":
                in_flight.append(runner.launch(wire.decode(payload, ScheduledStep)))
            elif kind == "collect":
                reply = wire.encode(runner.collect(in_flight.pop(0)))
            elif kind == "call":
                feature, method, args = payload
                calls.append((message_id, _as_future(runner.call, feature, method, *args)))
                calls = _answer_done(conn, calls)
                continue  # answered by _answer_done, now or once done
            conn.send_bytes(wire.encode(["ok", message_id, reply]))
        except Exception:  # the engine must learn why the runner failed, not only that it did
            conn.send_bytes(wire.encode(["crash", message_id, traceback.format_exc()]))
        calls = _answer_done(conn, calls)


def _answer_done(conn: Any, calls: list[tuple[int, concurrent.futures.Future]]) -> list:
    """Send the answers of the finished calls; returns those still under way."""
    from loomserve.platform import wire

    waiting = []
    for message_id, future in calls:
        if not future.done():
            waiting.append((message_id, future))
        elif future.exception() is None:
            conn.send_bytes(wire.encode(["ok", message_id, future.result()]))
        else:
            conn.send_bytes(wire.encode(["error", message_id, str(future.exception())]))
    return waiting

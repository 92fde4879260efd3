"""Executors: what stands between EngineCore and its runner(s).

EngineCore asks the executor how many KV blocks fit (`measure_kv_blocks`), has it allocate them (`init_kv_cache`),
then hands it steps as values (`launch`, later `collect`) and feature calls (`call`, answered by a future). The
in-process executor holds the runner itself; the multi-process one runs one runner process per tensor-parallel
rank and sends each of them every step and call over a pipe in their wire form (`wire.py`), in order, so a
launched step can be collected after the next one is launched, as in process. The ranks run the same forward over
their shards and meet in its collectives (torch.distributed); rank 0's answers are the executor's. A rank that is
not a child process (another node's, a Ray actor: `distributed/multi_node.py`, `distributed/ray_executor.py`) runs
the same worker loop over a socket to the executor (`serve_rank_at`).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import multiprocessing
import socket
import threading
import traceback
from collections.abc import Callable
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

    calls_back: bool  # launch takes `before_sample`, called in the runner's process once the forward is under way

    def collect(self, handle: Any) -> StepResult: ...

    def call(self, feature: str, method: str, *args: Any) -> concurrent.futures.Future:
        """A call to a feature's runner hook; the future fails with ValueError when it cannot be done."""

    def shutdown(self) -> None: ...


def create_executor(config: EngineConfig) -> Executor:
    if config.parallel_config.distributed_executor_backend == "mp":
        return MultiprocExecutor(config)
    if config.parallel_config.distributed_executor_backend == "ray":
        from loomserve.platform.distributed.ray_executor import RayExecutor

        return RayExecutor(config)
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

    calls_back = True

    def launch(self, step: ScheduledStep, before_sample: Callable[[], None] | None = None) -> Any:
        return self.runner.launch(step, before_sample)

    def collect(self, handle: Any) -> StepResult:
        return self.runner.collect(handle)

    def call(self, feature: str, method: str, *args: Any) -> concurrent.futures.Future:
        return _as_future(self.runner.call, feature, method, *args)

    def shutdown(self) -> None:
        pass


class _RankLink:
    """The executor's end of one rank's connection (a pipe to a local process, a socket to a remote rank or a Ray
    actor) and the thread that hands its replies to the waiting futures."""

    def __init__(self, conn: Any, rank: int) -> None:
        self.conn = conn
        self.ids = itertools.count()
        self.pending: dict[int, concurrent.futures.Future] = {}
        self.dead = False  # the worker is gone: every call fails at once
        self.lock = threading.Lock()  # one sender at a time; the reader thread only receives
        self.reader = threading.Thread(target=self._read, name=f"loomserve-runner-reader-{rank}", daemon=True)
        self.reader.start()

    def send(self, kind: str, payload: Any = None) -> concurrent.futures.Future:
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
            except OSError:  # the reader fails this future too, once it sees the connection closed
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

    def shutdown(self) -> None:
        if not self.dead:
            try:
                self.send("shutdown").result(10)
            except (concurrent.futures.TimeoutError, RuntimeError):
                pass
        self.conn.close()


class _RankProcess(_RankLink):
    """A rank in a local runner process, spoken to over a pipe."""

    def __init__(self, config: EngineConfig, rank: int, init_method: str) -> None:
        ctx = multiprocessing.get_context("spawn")  # a forked CUDA context is unusable; spawn is also what CI tests
        conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(config, child, rank, init_method),
                                   name=f"loomserve-runner-{rank}", daemon=True)
        self.process.start()
        child.close()
        super().__init__(conn, rank)

    def shutdown(self) -> None:
        if self.process.is_alive():
            self.send("shutdown")
            self.process.join(10)
            if self.process.is_alive():
                self.process.kill()
        self.conn.close()


def _all_of(futures: list[concurrent.futures.Future], pick: Any) -> concurrent.futures.Future:
    """A future of `pick([each result])` once every future is done, or of the first failure as soon as it comes:
    the other ranks may be stuck in a collective waiting for the failed one."""
    combined: concurrent.futures.Future = concurrent.futures.Future()
    remaining = [len(futures)]
    lock = threading.Lock()

    def one_done(future: concurrent.futures.Future) -> None:
        with lock:
            if combined.done():
                return
            if future.exception() is not None:
                combined.set_exception(future.exception())
                return
            remaining[0] -= 1
            if not remaining[0]:
                combined.set_result(pick([f.result() for f in futures]))

    for future in futures:
        future.add_done_callback(one_done)
    return combined


def _first(results: list[Any]) -> Any:
    return results[0]


class MultiprocExecutor:
    """One runner process per tensor-parallel rank. Every step and call goes to every rank (they run the same
    forward, each over its shard, and meet in its collectives); rank 0's answer is the executor's. With more than one
    node, this node's share of the ranks are local processes and the rest connect from the other nodes' headless
    launches (`distributed/multi_node.py`)."""

    calls_back = False

    def __init__(self, config: EngineConfig) -> None:
        pc = config.parallel_config
        if pc.nnodes == 1:
            init_method = f"tcp://127.0.0.1:{_free_port()}" if pc.tensor_parallel_size > 1 else ""
            self.ranks: list[_RankLink] = [_RankProcess(config, rank, init_method)
                                           for rank in range(pc.tensor_parallel_size)]
            return
        from loomserve.platform.distributed.multi_node import accept_remote_ranks, node_ranks, rank_listener

        if pc.node_rank != 0:
            raise ValueError(f"node {pc.node_rank} runs only its ranks (`loomserve serve ... --headless`); the engine "
                             "runs on node 0")
        listener = rank_listener(pc)  # before the local ranks start: a node that connects early is not refused
        init_method = f"tcp://{pc.master_addr}:{pc.master_port}"
        local: list[_RankLink] = [_RankProcess(config, rank, init_method) for rank in node_ranks(pc, 0)]
        remote = accept_remote_ranks(listener, range(len(local), pc.tensor_parallel_size))
        self.ranks = local + [_RankLink(remote[rank], rank) for rank in sorted(remote)]

    def _broadcast(self, kind: str, payload: Any = None, pick: Any = _first) -> concurrent.futures.Future:
        """Send one message to every rank; the future gives `pick` of their answers."""
        return _all_of([rank.send(kind, payload) for rank in self.ranks], pick)

    def measure_kv_blocks(self) -> int:
        return self._broadcast("measure_kv_blocks", pick=min).result()  # what fits on every rank

    def init_kv_cache(self, num_blocks: int) -> None:
        self._broadcast("init_kv_cache", num_blocks).result()

    def launch(self, step: ScheduledStep) -> Any:
        from loomserve.platform import wire

        return self._broadcast("launch", wire.encode(step))

    def collect(self, handle: Any) -> StepResult:
        from loomserve.platform import wire

        handle.result()  # launched (or raised)
        return wire.decode(self._broadcast("collect").result(), StepResult)

    def call(self, feature: str, method: str, *args: Any) -> concurrent.futures.Future:
        return self._broadcast("call", [feature, method, list(args)])

    def shutdown(self) -> None:
        for rank in self.ranks:
            rank.shutdown()


def _free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free now on `host` (the loopback; "": every interface), where the ranks rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _worker_main(config: EngineConfig, conn: Any, rank: int, init_method: str) -> None:
    """A runner process: messages are handled in order; calls whose answer comes later (a future) are answered
    once done. Ranks other than 0 answer a collect with nothing: rank 0's result is the step's."""
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
                _join_tensor_parallel(config, rank, init_method)
                runner = ModelRunner(config)
            reply: Any = None
            if kind == "measure_kv_blocks":
                reply = runner.measure_kv_blocks()
            elif kind == "init_kv_cache":
                runner.init_kv_cache(payload)
            elif kind == "launch":
                in_flight.append(runner.launch(wire.decode(payload, ScheduledStep)))
            elif kind == "collect":
                result = runner.collect(in_flight.pop(0))
                reply = wire.encode(result) if rank == 0 else None
            elif kind == "call":
                feature, method, args = payload
                calls.append((message_id, _as_future(runner.call, feature, method, *args)))
                calls = _answer_done(conn, calls)
                continue  # answered by _answer_done, now or once done
            conn.send_bytes(wire.encode(["ok", message_id, reply]))
        except Exception:  # the engine must learn why the runner failed, not only that it did
            conn.send_bytes(wire.encode(["crash", message_id, traceback.format_exc()]))
        calls = _answer_done(conn, calls)


def serve_rank_at(address: tuple[str, int], authkey: bytes | None, config: EngineConfig, rank: int,
                  init_method: str) -> None:
    """A rank that is not the executor's child (another node's, a Ray actor): connect to the executor's listener,
    say which rank this is, then run the worker loop over that socket until the executor shuts it down."""
    from multiprocessing.connection import Client

    from loomserve.platform import wire

    conn = Client(address, authkey=authkey)
    conn.send_bytes(wire.encode(rank))
    try:
        _worker_main(config, conn, rank, init_method)
    finally:
        conn.close()


def _join_tensor_parallel(config: EngineConfig, rank: int, init_method: str) -> None:
    """Join the ranks' process group before the model is built (its layers read their shard from it)."""
    pc = config.parallel_config
    if pc.tensor_parallel_size == 1:
        return
    import torch

    from loomserve.platform.distributed.parallel_state import init_tensor_parallel

    device = config.model_config.device
    if device.type == "cuda":  # this node's (or Ray actor's) visible devices: the local rank's is its index there
        torch.cuda.set_device(rank % torch.cuda.device_count())
    init_tensor_parallel(rank, pc.tensor_parallel_size, init_method, device, pc.enable_expert_parallel)


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

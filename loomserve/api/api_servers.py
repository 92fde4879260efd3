"""`--api-server-count N` (vLLM's flag): N API server processes in front of the same engines, so the front end's
per-token work (HTTP, tokenizing, detokenizing, SSE) runs on N cores instead of one.

The main process binds the socket and checks the configuration (as one process does, `launch.py`), starts every
model's engines once, then spawns the API processes: each gets the listening socket (the kernel hands each new
connection to one of them), runs the same app as a single process (`launch.serve_app`) and joins the engines as
client i of N. Metrics are summed across processes by prometheus_client's multiprocess mode (its folder is set here,
before any API process imports prometheus_client). The main process says "Ready" once every API process serves,
stops the group on Ctrl-C / SIGTERM (each API process gets --shutdown-timeout to finish its requests, then the
engines stop), and takes the whole group down, with one line saying why, when an API process dies.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait

from loomserve.api.frontend_flags import FrontendOptions
from loomserve.api.served_models import EngineStartError, one_line, served_name
from loomserve.platform.config import EngineArgs
from loomserve.platform.engine_group import EngineGroup, EngineLink, spawn_reporting
from loomserve.platform.process_name import API_PREFIX
from loomserve.platform.threads import available_cores

logger = logging.getLogger("loomserve")

_READY = "ready"
_STARTUP_TIMEOUT_S = 900.0
_STOP_GRACE_S = 10.0  # beyond --shutdown-timeout, for an API process to close its engines' sockets and exit
_MAX_DEFAULT_COUNT = 4


def add_api_server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-server-count", "-asc", type=_positive_int, default=None, metavar="N",
                        help="API server processes sharing the engines (default: 1 on CPU; on a GPU host one per 4 "
                             f"usable cores, at most {_MAX_DEFAULT_COUNT})")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def api_server_count(requested: int | None, device: str, cores: int | None = None) -> int:
    """`requested`, else the default for the main model's `device` type ("cpu", "cuda"). A CPU engine's threads take
    every core but one (platform/threads.py): more API processes would take cores from the model. On a GPU host one
    API process saturates near 10k streamed chunks/s (issue 13) while the engine does several times that: one per 4
    cores leaves cores to the engines' host work and the tokenizers, and past 4 the engine, not the front end, is
    what limits."""
    if requested is not None:
        return requested
    if device == "cpu":
        return 1
    return max(1, min(_MAX_DEFAULT_COUNT, (cores or available_cores()) // 4))


def serve_group(ns: argparse.Namespace, all_args: list[EngineArgs], options: FrontendOptions,
                listener: socket.socket, count: int) -> None:
    """Serve with `count` API processes until stopped; EngineStartError when an engine or an API process does not
    start, RuntimeError when an API process dies while serving."""
    metrics_dir = tempfile.mkdtemp(prefix="loomserve-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # inherited by the API processes, read at their import
    groups: list[EngineGroup] = []
    servers: list[_APIServer] = []
    try:
        _start_engines(all_args, groups)
        for index in range(count):
            links = [EngineLink(group.addresses, index, count) for group in groups]
            own = options if index == 0 else dataclasses.replace(options, lora_modules=[])  # loaded once, by one
            servers.append(_APIServer(ns, all_args, own, listener, links))
        listener.close()  # the API processes hold it now
        for server in servers:
            server.wait_ready()
        logger.info(options.ready_message)
        _watch(servers)
    finally:
        _stop(servers, options.features.shutdown_timeout)
        for group in groups:
            group.stop()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _start_engines(all_args: Sequence[EngineArgs], groups: list[EngineGroup]) -> None:
    """Every model's engines, loading at once (added to `groups` as they start, for the caller to stop); all or
    none."""
    for args in all_args:
        logger.info("Loading %s from %s", served_name(args), args.model)
        groups.append(EngineGroup(args, args.create_engine_config().parallel_config.data_parallel_size))
    for args, group in zip(all_args, groups):
        try:
            group.wait_ready()
        except RuntimeError as exc:
            logger.debug("%s did not start", served_name(args), exc_info=exc)
            raise EngineStartError(f"{served_name(args)} did not start: {one_line(exc)}") from exc


def _watch(servers: Sequence[_APIServer]) -> None:
    """Block while every API process serves; RuntimeError once one has exited."""
    by_sentinel = {server.proc.sentinel: server for server in servers}
    gone = wait(list(by_sentinel))  # Ctrl-C and SIGTERM interrupt it
    server = by_sentinel[gone[0]]
    server.proc.join(5)  # its pipe closes a moment before the exit code can be read
    raise RuntimeError(f"API server {server.index} exited ({_how(server.proc.exitcode)}): the server stops")


def _how(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


def _stop(servers: Sequence[_APIServer], shutdown_timeout: float) -> None:
    """SIGTERM to every API process (uvicorn's graceful stop, `shutdown_timeout` for requests in flight), then wait;
    one that does not exit in time is killed."""
    for server in servers:
        if server.proc.is_alive():
            server.proc.terminate()
    deadline = time.monotonic() + shutdown_timeout + _STOP_GRACE_S
    for server in servers:
        server.proc.join(max(0.0, deadline - time.monotonic()))
        if server.proc.is_alive():
            server.proc.kill()
            server.proc.join()


class _APIServer:
    """One API server process, started now."""

    def __init__(self, ns: argparse.Namespace, all_args: list[EngineArgs], options: FrontendOptions,
                 listener: socket.socket, links: list[EngineLink]) -> None:
        self.index = links[0].client_index
        self.proc, self.started = spawn_reporting(run_api_server, (ns, all_args, options, listener, links),
                                                  f"{API_PREFIX}{self.index}", daemon=False)

    def wait_ready(self) -> None:
        """Block until the process serves; EngineStartError saying why it does not."""
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.started.poll(0.5):
                try:
                    said = self.started.recv()
                except EOFError:
                    said = None
                if said == _READY:
                    return
                if said is not None:
                    raise EngineStartError(said)
            if not self.proc.is_alive():
                raise EngineStartError(f"API server {self.index} exited ({_how(self.proc.exitcode)}) while starting")
        raise EngineStartError(f"API server {self.index} did not start in time")


def run_api_server(ns: argparse.Namespace, all_args: list[EngineArgs], options: FrontendOptions,
                   listener: socket.socket, links: list[EngineLink], started: Connection) -> None:
    """Entry point of an API server process: serve `listener` with front ends joined to the engines of `links`,
    telling the main process (`started`) once it serves, or why it could not."""
    from loomserve.api.launch import serve_app
    from loomserve.platform.logs import configure_logging
    from loomserve.platform.parent_watch import exit_with_parent
    from loomserve.platform.threads import apply_front_end_threads

    # The main process stops the group with SIGTERM: an exit that runs the process's cleanup, while it starts and
    # after uvicorn's graceful stop (which re-raises the signal it caught); Ctrl-C is the main process's to handle.
    signal.signal(signal.SIGTERM, _exit_quietly)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    configure_logging(f"[api-{links[0].client_index}]")
    exit_with_parent(lambda: shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True))
    apply_front_end_threads()
    code = 0
    try:
        serve_app(ns, all_args, options, listener, links, on_ready=lambda: started.send(_READY))
    except SystemExit:  # asked to stop (SIGTERM)
        pass
    except Exception as exc:
        logger.debug("API server %d stopped", links[0].client_index, exc_info=exc)
        try:
            started.send(one_line(exc))
        except OSError:  # the main process is gone: nobody to tell
            pass
        code = 1
    # Requests are answered and the engines' sockets closed: leave without the interpreter's teardown of torch and
    # the tokenizers, which takes seconds on a loaded host and holds up the whole group's exit.
    logging.shutdown()
    os._exit(code)

def _exit_quietly(signum: int, frame: object) -> None:
    raise SystemExit(0)

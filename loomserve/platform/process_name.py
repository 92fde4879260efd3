"""The name a process shows in `ps`, `top` and /proc/PID/comm, so engines and API processes are told apart (vLLM
titles its processes likewise): the name given to a spawned child becomes its kernel name as it starts."""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import sys
from collections.abc import Callable
from typing import Any

ENGINE_PREFIX = "loom-engine-"
API_PREFIX = "loom-api-"
_PR_SET_NAME = 15  # prctl(2): the calling thread's name; the main thread's is the process's
_MAX_NAME = 15  # bytes the kernel keeps


def set_process_name(name: str) -> None:
    """Name this process `name` (cut to 15 bytes) where the kernel supports it (Linux); elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_NAME, name.encode()[:_MAX_NAME], 0, 0, 0)


def run_named(target: Callable[..., None], *args: Any) -> None:
    """A spawned child's entry point: take the multiprocessing name as the process's, then run `target(*args)`."""
    set_process_name(multiprocessing.current_process().name)
    target(*args)

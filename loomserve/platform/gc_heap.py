"""Keeps the garbage collector off what a process built before serving (model, tokenizer, imported modules).

A full collection walks every tracked object; with the millions a loaded process holds, one stalls every
stream for milliseconds. Freezing that heap leaves collections only the objects made while serving
(as vLLM's engine does). Serving processes freeze it for good; an offline `LLM` only while it steps the engine,
so that the caller's `del llm; gc.collect()` still frees a model held in reference cycles.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
from collections.abc import Iterator


def freeze_startup_heap() -> None:
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Everything made before the block is off the collector inside it (a splice of the collector's lists, not a
    walk), and back on it after."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


# Frozen objects are never collected, not even at exit, where extension modules (triton's nanobind) then report
# each object of theirs as leaked: hand the heap back to the collector before the interpreter tears down.
atexit.register(gc.unfreeze)

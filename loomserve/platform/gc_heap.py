"""Keeps the garbage collector off what a process built at start-up (model, tokenizer, imported modules).

A full collection walks every tracked object; with the millions a loaded process holds, one stalls every
stream for milliseconds. Freezing the start-up heap leaves collections only the objects made while serving
(as vLLM's engine does).
"""

from __future__ import annotations

import atexit
import gc


def freeze_startup_heap() -> None:
    gc.collect()
    gc.freeze()


def thaw_startup_heap() -> None:
    """Hand what earlier engines of this process froze back to the collector, and collect: an `LLM` the caller
    dropped holds reference cycles (its model among them) that only a collection frees."""
    gc.unfreeze()
    gc.collect()


# Frozen objects are never collected, not even at exit, where extension modules (triton's nanobind) then report
# each object of theirs as leaked: hand the heap back to the collector before the interpreter tears down.
atexit.register(gc.unfreeze)

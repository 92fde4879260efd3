"""The heap freeze of an offline run: what existed before is off the collector while the engine steps, and back
on it after, so a dropped `LLM` held in reference cycles is freed by the caller's collection."""

from __future__ import annotations

import gc
import weakref

from loomserve.platform.gc_heap import frozen_heap


class _Node:
    pass


def _cycle() -> weakref.ref:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_a_cycle_made_inside_the_block_is_collected_inside_it():
    with frozen_heap():
        node = _cycle()
        gc.collect()
        assert node() is None


def test_a_cycle_dropped_inside_the_block_is_collected_after_it():
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    node = weakref.ref(a)
    with frozen_heap():
        del a, b
        gc.collect()
        assert node() is not None
    gc.collect()
    assert node() is None

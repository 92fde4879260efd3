"""The start-up heap freeze: off the collector while serving, handed back when another engine starts."""

from __future__ import annotations

import weakref

from loomserve.platform.gc_heap import freeze_startup_heap, thaw_startup_heap


class _Node:
    pass


def _dropped_cycle() -> weakref.ref:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    freeze_startup_heap()
    return weakref.ref(a)


def test_a_frozen_cycle_survives_collection_until_the_heap_is_thawed():
    import gc

    node = _dropped_cycle()
    gc.collect()
    assert node() is not None
    thaw_startup_heap()
    assert node() is None

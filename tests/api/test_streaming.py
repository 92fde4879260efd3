"""merge_async_iterators: items arrive tagged with their stream, and however the merge ends early, every engine
stream is closed at once (an engine stream's close aborts its request), with one stream as with several."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest

from loomserve.api.streaming import merge_async_iterators


def counting_streams(n: int, closed: list[int]):
    async def stream(i: int):
        try:
            for k in range(100):
                yield k
                await asyncio.sleep(0)
        finally:
            closed.append(i)

    return [stream(i) for i in range(n)]


@pytest.mark.parametrize("n", [1, 3])
def test_items_are_tagged_with_their_stream(n):
    async def run():
        closed: list[int] = []
        return [item async for item in merge_async_iterators(*counting_streams(n, closed))], closed

    items, closed = asyncio.run(run())
    assert sorted(items) == sorted((i, k) for i in range(n) for k in range(100))
    assert sorted(closed) == list(range(n))


@pytest.mark.parametrize("n", [1, 3])
def test_leaving_the_merge_early_closes_every_stream_at_once(n):
    async def run():
        closed: list[int] = []
        async with aclosing(merge_async_iterators(*counting_streams(n, closed))) as merged:
            async for _ in merged:
                break
        return list(closed)  # a copy: the loop's shutdown would still finalize forgotten generators into `closed`

    assert sorted(asyncio.run(run())) == list(range(n))


def test_merging_starts_one_task_per_stream_however_many_items_they_yield():
    async def run():
        started = 0

        def counting_factory(loop, coro, **kwargs):
            nonlocal started
            started += 1
            return asyncio.Task(coro, loop=loop, **kwargs)

        asyncio.get_running_loop().set_task_factory(counting_factory)
        items = [item async for item in merge_async_iterators(*counting_streams(3, []))]
        return started, len(items)

    started, items = asyncio.run(run())
    assert items == 300 and started <= 3


def test_a_failing_stream_fails_the_merge_and_closes_the_others():
    async def failing():
        yield 0
        raise RuntimeError("engine died")

    async def run():
        closed: list[int] = []
        seen = []
        with pytest.raises(RuntimeError, match="engine died"):
            async for item in merge_async_iterators(failing(), *counting_streams(2, closed)):
                seen.append(item)
        return seen, list(closed)

    seen, closed = asyncio.run(run())
    assert (0, 0) in seen and sorted(closed) == [0, 1]

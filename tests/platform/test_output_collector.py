"""A request's stream reads the newest of its cumulative outputs, and an engine failure ends it."""

from __future__ import annotations

import asyncio

import pytest

from loomserve.platform.output_collector import OutputCollector


def test_a_lagging_reader_gets_only_the_newest_output():
    async def run() -> list[str]:
        collector = OutputCollector()
        for output in ("a", "ab", "abc"):
            collector.put_nowait(output)
        first = await collector.get()
        collector.put_nowait("abcd")
        return [first, await collector.get()]

    assert asyncio.run(run()) == ["abc", "abcd"]


def test_a_waiting_reader_wakes_when_an_output_comes():
    async def run() -> str:
        collector = OutputCollector()
        reader = asyncio.ensure_future(collector.get())
        await asyncio.sleep(0)
        assert not reader.done()
        asyncio.get_running_loop().call_soon(collector.put_nowait, "a")
        return await asyncio.wait_for(reader, 5)

    assert asyncio.run(run()) == "a"


def test_an_error_replaces_waiting_outputs_and_is_not_replaced():
    async def run() -> None:
        collector = OutputCollector()
        collector.put_nowait("a")
        collector.put_nowait(RuntimeError("engine died"))
        collector.put_nowait("ab")
        await collector.get()

    with pytest.raises(RuntimeError, match="engine died"):
        asyncio.run(run())

"""Async plumbing for the routes: merging engine streams, SSE framing, watching for a client that left."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel

T = TypeVar("T")

SSE_DONE = "data: [DONE]\n\n"


# Characters that JSON allows raw inside strings but that line-splitting clients (JavaScript, Python's
# str.splitlines) take for line ends: escaped, as OpenAI's and vLLM's servers do.
_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\u0085": "\\u0085"})


def sse(body: BaseModel) -> str:
    """One Server-Sent Event carrying `body` as JSON, on one line whoever splits it."""
    return f"data: {body.model_dump_json().translate(_LINE_BREAKS)}\n\n"


async def merge_async_iterators(*iterators: AsyncGenerator[T, None]) -> AsyncIterator[tuple[int, T]]:
    """Yield (index of the iterator, item) as items arrive from any iterator.

    Several iterators are read by one long-lived task each, through one queue: O(1) work per item, no task per
    item. A reader fetches its next item only once the merge has taken the last one (as a plain `anext` would), so a
    slow consumer lets cumulative engine outputs coalesce. However the merge ends (exhausted, failed, closed or
    cancelled), every iterator is closed, so an engine stream left unfinished aborts its request.
    """
    if len(iterators) == 1:  # the common case (n = 1): no task and no wait per item
        try:
            async for item in iterators[0]:
                yield 0, item
        finally:
            await iterators[0].aclose()
        return
    queue: asyncio.Queue[_Read] = asyncio.Queue()
    taken = [asyncio.Event() for _ in iterators]
    readers = [asyncio.ensure_future(_read(i, it, queue, taken[i])) for i, it in enumerate(iterators)]
    try:
        live = len(iterators)
        while live:
            read = await queue.get()
            if read.error is not None:
                raise read.error
            if read.done:
                live -= 1
                continue
            taken[read.index].set()
            yield read.index, read.item
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for it in iterators:
            await it.aclose()


@dataclass
class _Read:
    """What a reader of one iterator hands the merge: an item, the iterator's end, or its error."""

    index: int
    item: Any = None
    done: bool = False
    error: Exception | None = None


async def _read(index: int, iterator: AsyncGenerator[T, None], queue: asyncio.Queue[_Read],
                taken: asyncio.Event) -> None:
    """Queue each item of `iterator`, waiting until the merge takes it before fetching the next."""
    try:
        async for item in iterator:
            taken.clear()
            queue.put_nowait(_Read(index, item))
            await taken.wait()
    except Exception as exc:  # the merge raises it
        queue.put_nowait(_Read(index, error=exc))
        return
    queue.put_nowait(_Read(index, done=True))


async def run_unless_disconnected(raw_request: Request, work: Awaitable[T]) -> tuple[bool, T | None]:
    """Run `work` until it finishes or the client disconnects; (finished, result).

    A client that leaves cancels `work`, which closes its engine streams and so aborts their requests.
    """
    worker = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(raw_request))
    try:
        await asyncio.wait({worker, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if worker.done():
            return True, worker.result()
        return False, None
    finally:
        worker.cancel()
        watcher.cancel()
        await asyncio.gather(worker, watcher, return_exceptions=True)


async def _wait_for_disconnect(raw_request: Request) -> None:
    # The body has been read already, so the next ASGI message is the disconnect.
    while (await raw_request.receive())["type"] != "http.disconnect":
        pass

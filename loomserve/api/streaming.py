"""Async plumbing for the routes: merging engine streams, SSE framing, watching for a client that left."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import TypeVar

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

    However the merge ends (exhausted, failed, closed or cancelled), every iterator is closed, so an
    engine stream left unfinished aborts its request.
    """
    if len(iterators) == 1:  # the common case (n = 1): no task and no wait per item
        try:
            async for item in iterators[0]:
                yield 0, item
        finally:
            await iterators[0].aclose()
        return
    pending = {asyncio.ensure_future(anext(it)): i for i, it in enumerate(iterators)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(iterators[i]))] = i
                yield i, item
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for it in iterators:
            await it.aclose()


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

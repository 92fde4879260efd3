"""The hand-off of one request's outputs from the front end's output loop to the request's stream.

Outputs are cumulative, so a stream that lags behind the engine needs only the newest: the collector holds one
output (or the error that ends the stream) and wakes its one reader at most once per engine step, with no queue
and no task per token.
"""

from __future__ import annotations

import asyncio
from typing import Any


class OutputCollector:
    __slots__ = ("_item", "_waiter")

    def __init__(self) -> None:
        self._item: Any = None  # the newest RequestOutput, or the exception to raise
        self._waiter: asyncio.Future | None = None

    def put_nowait(self, item: Any) -> None:
        """Replace what is waiting (an error is never replaced) and wake the reader."""
        if not isinstance(self._item, Exception):
            self._item = item
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> Any:
        """The newest item once there is one; raises the error put in its place."""
        while self._item is None:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item, self._item = self._item, None
        if isinstance(item, Exception):
            raise item
        return item

"""Admission control per served model: at most `--max-num-seqs` running plus `--max-queued-requests` waiting engine
requests; past that a call is answered 429 with Retry-After at once (SGLang's `--max-queued-requests`), so a flood
costs no memory beyond what the server can work off."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from loomserve.api.errors import APIError

T = TypeVar("T")

RETRY_AFTER_S = 1  # what a 429 tells the client to wait


@dataclass
class Admission:
    capacity: int  # engine requests (sequences) in flight at once
    in_flight: int = 0

    @contextmanager
    def hold(self, count: int) -> Iterator[Hold]:
        """`count` engine requests admitted for the block (429 if they do not fit), or until a stream that took
        the hold over ends."""
        if self.in_flight + count > self.capacity:
            raise APIError(f"The server is at capacity ({self.in_flight} requests in flight, at most "
                           f"{self.capacity}); retry later", status=429, headers={"Retry-After": str(RETRY_AFTER_S)})
        self.in_flight += count
        held = Hold(self, count)
        try:
            yield held
        finally:
            if not held.handed_over:
                held.release()


@dataclass
class Hold:
    admission: Admission
    count: int
    handed_over: bool = False
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.admission.in_flight -= self.count

    def over(self, stream: AsyncIterator[T]) -> AsyncIterator[T]:
        """`stream`, holding the admission until it ends (a streamed answer outlives its route's call)."""
        self.handed_over = True
        return self._held(stream)

    async def _held(self, stream: AsyncIterator[T]) -> AsyncIterator[T]:
        try:
            async for item in stream:
                yield item
        finally:
            self.release()

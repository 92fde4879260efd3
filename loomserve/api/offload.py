"""The front end's heavy work (tokenizing, chat rendering, serializing big responses) off the event loop, in a
bounded pool of its own, so /health, /metrics and small requests keep answering while a large request is processed.
Media decoding has a pool of its own (modalities/frontend.py), and media downloads take no thread at all."""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

T = TypeVar("T")

_SLICE_BYTES = 1 << 20
_POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="loomserve-frontend")


async def offload(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` on the front end's pool."""
    return await asyncio.get_running_loop().run_in_executor(_POOL, functools.partial(fn, *args, **kwargs))


async def json_response(body: BaseModel, long_list: str | None = None) -> Response:
    """`body` as a JSON response, serialized on the pool. The items of its field `long_list` (a pooling answer's
    `data`: thousands of embeddings, tens of megabytes) are serialized one by one, so the pool's thread lets go of
    the GIL between items instead of holding it for the whole answer while the event loop waits."""
    if long_list is None:
        return Response(await offload(body.model_dump_json), media_type="application/json")
    items = getattr(body, long_list)
    envelope = body.model_copy(update={long_list: []}).model_dump_json()
    joined = await offload(lambda: ",".join(item.model_dump_json() for item in items))
    empty = f'"{long_list}":[]'  # field names are not escaped, and a string value cannot hold this unescaped
    head, _, tail = envelope.partition(empty)
    content = "".join((head, f'"{long_list}":[', joined, "]", tail)).encode()
    return StreamingResponse(_slices(content), media_type="application/json",
                             headers={"content-length": str(len(content))})


async def _slices(content: bytes) -> AsyncIterator[bytes]:
    """A large body a slice per turn of the event loop: one write of tens of megabytes holds it for a second."""
    for start in range(0, len(content), _SLICE_BYTES):
        yield content[start:start + _SLICE_BYTES]

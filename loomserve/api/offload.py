"""The front end's heavy work (tokenizing, chat rendering, big responses) off the event loop, in a bounded pool of
its own, so /health, /metrics and small requests keep answering while a large request is processed. Media loading
has a pool of its own (modalities/media_pool.py): a slow media host cannot take these threads."""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi.responses import Response
from pydantic import BaseModel

T = TypeVar("T")

_POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="loomserve-frontend")


async def offload(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` on the front end's pool."""
    return await asyncio.get_running_loop().run_in_executor(_POOL, functools.partial(fn, *args, **kwargs))


async def json_response(body: BaseModel) -> Response:
    """`body` as a JSON response, serialized on the pool (a 2,048-embedding answer is tens of megabytes)."""
    content = await offload(body.model_dump_json)
    return Response(content, media_type="application/json")

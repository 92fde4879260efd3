"""The app of `loomserve proxy --prefill URL... --decode URL...` (flags in cli.py): one OpenAI-compatible endpoint
in front of disaggregated prefill and decode instances (`--kv-transfer-config`, kv_role kv_producer / kv_consumer).

Each completion or chat request goes first to a prefill instance (round robin) with max_tokens 1, no streaming and
`kv_transfer_params: {"do_remote_decode": true}`; its answer says where the prompt's KV waits. The request then
goes, as the client sent it plus those `kv_transfer_params`, to a decode instance (round robin), whose answer,
whole or streamed, is the client's. An instance that cannot be reached costs the request a 502 (or, once a
stream has started, an error event ending it); the proxy keeps serving.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from loomserve.api.errors import error_body, error_response
from loomserve.api.streaming import SSE_DONE, sse

logger = logging.getLogger(__name__)

_ROUTES = ("/v1/completions", "/v1/chat/completions")
_FORWARDED_HEADERS = ("authorization",)


class Instances:
    """The instances of one role, taken in turn."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self.turn = itertools.cycle(self.urls)

    def next(self) -> str:
        return next(self.turn)


def build_proxy_app(prefill: list[str], decode: list[str]) -> FastAPI:
    prefills, decodes = Instances(prefill), Instances(decode)
    clients: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        clients["http"] = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0))
        yield
        await clients["http"].aclose()

    app = FastAPI(lifespan=lifespan)

    async def route(request: Request) -> Response:
        body = await request.json()
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED_HEADERS}
        return await _disaggregated(clients["http"], request.url.path, body, headers, prefills.next(), decodes.next())

    for path in _ROUTES:
        app.post(path)(route)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED_HEADERS}
        return await _forward(clients["http"], "GET", decodes.next() + "/v1/models", None, headers)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    return app


async def _disaggregated(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], headers: dict[str, str], prefill: str, decode: str
) -> Response:
    """Prefill on one instance, then the client's request on a decode instance with the transfer parameters."""
    first = await _forward(client, "POST", prefill + path, _prefill_body(body), headers)
    if first.status_code != 200:
        return first  # the prefill instance's own error (bad input is refused there first), or a 502
    params = json.loads(first.body).get("kv_transfer_params")
    decode_body = {**body, "kv_transfer_params": params}
    if not body.get("stream"):
        return await _forward(client, "POST", decode + path, decode_body, headers)
    try:
        response = await client.send(client.build_request("POST", decode + path, json=decode_body, headers=headers),
                                     stream=True)
    except httpx.HTTPError as e:
        return _unreachable(decode, e)
    if response.status_code != 200:
        content = await response.aread()
        await response.aclose()
        return Response(content, response.status_code, media_type=response.headers.get("content-type"))
    return StreamingResponse(_relay(response, decode), media_type="text/event-stream")


def _prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The client's request cut to its prefill: one token, one choice, no stream, the KV kept for a decode."""
    cut = {k: v for k, v in body.items() if k not in ("stream_options", "max_completion_tokens")}
    return {**cut, "max_tokens": 1, "n": 1, "stream": False, "kv_transfer_params": {"do_remote_decode": True}}


async def _forward(
    client: httpx.AsyncClient, method: str, url: str, body: dict[str, Any] | None, headers: dict[str, str]
) -> Response:
    try:
        r = await client.request(method, url, json=body, headers=headers)
    except httpx.HTTPError as e:
        return _unreachable(url, e)
    return Response(r.content, r.status_code, media_type=r.headers.get("content-type"))


async def _relay(response: httpx.Response, decode: str) -> AsyncIterator[bytes]:
    """The decode instance's events as they come; if it goes away mid-stream, an error event ends the stream."""
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    except httpx.HTTPError as e:
        logger.warning("the decode instance %s failed mid-stream: %s", decode, e)
        yield sse(error_body(502, f"the decode instance failed mid-stream ({type(e).__name__})")).encode()
        yield SSE_DONE.encode()
    finally:
        await response.aclose()


def _unreachable(url: str, e: Exception) -> JSONResponse:
    logger.warning("%s cannot be reached: %s", url, e)
    return error_response(502, f"an instance behind this proxy cannot be reached ({type(e).__name__})")

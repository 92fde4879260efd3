"""An ASGI middleware adding headers to every HTTP response, computed as the response starts (so they can say
what the server knows then: a request id, load metrics). Pure ASGI: streamed answers pass through untouched."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

Headers = list[tuple[bytes, bytes]]


class ResponseHeadersMiddleware:
    """`headers_for(scope)` -> the (name, value) pairs to add to that request's response (none: nothing)."""

    def __init__(self, app: ASGIApp, headers_for: Callable[[Scope], Headers]) -> None:
        self.app = app
        self.headers_for = headers_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = self.headers_for(scope)
                if extra:
                    message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def request_header(scope: Scope, name: bytes) -> str | None:
    """The value of request header `name` (lower case), if the client sent it."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None

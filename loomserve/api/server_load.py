"""`--enable-server-load-tracking`: the requests being answered right now (each POST from its arrival until its
last byte, streamed or not), read at GET /load as `{"server_load": N}`, vLLM's route for load balancers."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Request
from starlette.types import ASGIApp, Receive, Scope, Send

router = APIRouter()


@dataclass
class ServerLoad:
    in_flight: int = 0


class ServerLoadMiddleware:
    def __init__(self, app: ASGIApp, load: ServerLoad) -> None:
        self.app = app
        self.load = load

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        self.load.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.load.in_flight -= 1


@router.get("/load")
async def server_load(request: Request) -> dict[str, int]:
    return {"server_load": request.app.state.server_load.in_flight}

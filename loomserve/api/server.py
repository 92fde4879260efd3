"""The FastAPI app: the engine's lifetime, the routes, the API-key check and OpenAI-shaped errors."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from loomserve import __version__
from loomserve.api.chat import render_chat
from loomserve.api.errors import APIError, error_response, exception_response
from loomserve.api.metrics import CONTENT_TYPE, PrometheusStatLogger
from loomserve.api.prompts import check_vocab
from loomserve.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from loomserve.api.serving import check_model
from loomserve.api.serving_chat import create_chat_completion
from loomserve.api.serving_completion import create_completion
from loomserve.api.serving_lora import load_startup_adapters
from loomserve.api.serving_lora import router as lora_router
from loomserve.platform.async_llm import AsyncLLM, EngineDeadError
from loomserve.platform.config import EngineArgs

OPEN_PATHS = frozenset({"/health", "/metrics", "/version"})  # served without an API key

router = APIRouter()


def build_app(
    engine_args: EngineArgs, api_key: str | None = None, lora_modules: list[tuple[str, str]] | None = None
) -> FastAPI:
    """The app; its engine starts (in its own process) when the app starts and stops with it, having loaded
    the `lora_modules` (name, path) adapters."""
    stat_logger = PrometheusStatLogger(engine_args.served_model_name or engine_args.model.rstrip("/"))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.engine = AsyncLLM.from_engine_args(engine_args, stat_loggers=[stat_logger])
        try:
            await load_startup_adapters(app.state.engine, lora_modules or [])
            yield
        finally:
            app.state.engine.shutdown()

    app = FastAPI(title="loomserve", version=__version__, lifespan=lifespan)
    app.state.metrics = stat_logger
    app.include_router(router)
    app.include_router(lora_router)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    for handled in (APIError, EngineDeadError, Exception):
        app.add_exception_handler(handled, _api_error)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    return app


def _engine(request: Request) -> AsyncLLM:
    return request.app.state.engine


Engine = Annotated[AsyncLLM, Depends(_engine)]


# ---------------------------------------------------------------- routes


@router.get("/health")
async def health(engine: Engine) -> Response:
    await engine.check_health()
    return Response(status_code=200)


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/models")
async def models(engine: Engine) -> ModelList:
    config = engine.model_config
    card = ModelCard(id=config.served_model_name, root=config.model, max_model_len=config.max_model_len)
    adapters = [
        ModelCard(id=lora.lora_name, root=lora.lora_path, parent=config.served_model_name,
                  max_model_len=config.max_model_len)
        for lora in engine.loras.adapters.values()
    ]
    return ModelList(data=[card, *adapters])


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, engine: Engine) -> TokenizeResponse:
    check_model(engine, body.model)
    if body.messages is not None:
        text = render_chat(engine.tokenizer, body.messages, body.add_generation_prompt)
        add_special_tokens = bool(body.add_special_tokens)
    else:
        text = body.prompt
        add_special_tokens = body.add_special_tokens is not False
    tokens = engine.tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=engine.model_config.max_model_len)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, engine: Engine) -> DetokenizeResponse:
    check_model(engine, body.model)
    check_vocab(body.tokens, engine.model_config.vocab_size, param="tokens")
    return DetokenizeResponse(prompt=engine.tokenizer.decode(body.tokens))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, raw_request: Request, engine: Engine) -> Response:
    await engine.check_health()
    return await create_completion(engine, body, raw_request)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, raw_request: Request, engine: Engine) -> Response:
    await engine.check_health()
    return await create_chat_completion(engine, body, raw_request)


# ---------------------------------------------------------------- errors


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    return exception_response(exc)


async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail))


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0]
    if first["type"] == "json_invalid":
        return error_response(400, f"Malformed JSON in the request body: {first.get('ctx', {}).get('error')}")
    where = [".".join(str(part) for part in e["loc"][1:]) or "body" for e in errors]
    message = "; ".join(f"{loc}: {e['msg']}" for loc, e in zip(where, errors, strict=True))
    param = str(first["loc"][1]) if len(first["loc"]) > 1 else None
    return error_response(400, message, param)


class APIKeyMiddleware:
    """401 on every path but /health, /metrics and /version without `Authorization: Bearer <key>`."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and not self._authorized(scope):
            response = error_response(401, "Invalid or missing API key: send `Authorization: Bearer <key>`")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(given, self.expected)

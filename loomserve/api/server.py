"""The FastAPI app: the engine's lifetime, the routes, the API-key check and OpenAI-shaped errors."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from loomserve import __version__
from loomserve.api.admission import Admission
from loomserve.api.body_limit import BodySizeLimitMiddleware
from loomserve.api.chat import render_chat
from loomserve.api.errors import APIError, error_response, exception_response
from loomserve.api.limits import ServerLimits
from loomserve.api.lora_paths import LoRAPathPolicy
from loomserve.api.metrics import CONTENT_TYPE, PrometheusStatLogger
from loomserve.api.metrics_group import MetricsGroup
from loomserve.api.offload import offload
from loomserve.api.openapi import install_openapi
from loomserve.api.pooling_routes import pooling_router
from loomserve.api.prompts import check_vocab, encode_fitting
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
from loomserve.api.served_models import Models, ServedModels, check_unique_names, served_name, start_engines
from loomserve.api.serving_chat import create_chat_completion
from loomserve.api.serving_completion import create_completion
from loomserve.api.serving_lora import load_startup_adapters
from loomserve.api.serving_lora import router as lora_router
from loomserve.platform.async_llm import EngineDeadError
from loomserve.platform.config import EngineArgs
from loomserve.platform.gc_heap import freeze_startup_heap

OPEN_PATHS = frozenset({"/health", "/metrics", "/version"})  # served without an API key

router = APIRouter()


def build_app(
    engine_args: EngineArgs,
    api_key: str | None = None,
    pooling_models: Sequence[EngineArgs] = (),
    lora_modules: Sequence[tuple[str, str]] = (),
    limits: ServerLimits = ServerLimits(),
    lora_paths: LoRAPathPolicy | None = None,
) -> FastAPI:
    """The app; its engines (the main model's, then one per pooling model, each in its own process) start when
    the app starts and stop with it, the main model having loaded the `lora_modules` (name, path) adapters."""
    all_args = [engine_args, *pooling_models]
    check_unique_names(all_args)
    stat_loggers = [PrometheusStatLogger(served_name(args)) for args in all_args]
    admissions = {served_name(args): Admission(args.max_num_seqs + limits.max_queued_requests) for args in all_args}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engines = await start_engines(all_args, stat_loggers)
        app.state.models = ServedModels(engines, limits, admissions,
                                        lora_paths or LoRAPathPolicy.of([], [path for _, path in lora_modules], False))
        try:
            await load_startup_adapters(app.state.models, lora_modules)
            freeze_startup_heap()
            yield
        finally:
            app.state.models.shutdown()

    app = FastAPI(title="loomserve", version=__version__, lifespan=lifespan)
    app.state.metrics = MetricsGroup(stat_loggers)
    app.include_router(router)
    app.include_router(pooling_router)
    app.include_router(lora_router)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    for handled in (APIError, EngineDeadError, Exception):
        app.add_exception_handler(handled, _api_error)
    install_openapi(app, limits)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=limits.max_request_body_bytes)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)  # added last: runs first, before any body is read
    return app


# ---------------------------------------------------------------- routes


@router.get("/health")
async def health(models: Models) -> Response:
    """200 while every engine runs and has answered within --engine-heartbeat-timeout; 503 otherwise."""
    await models.check_health()
    models.check_heartbeats()
    return Response(status_code=200)


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)


@router.post("/reset_prefix_cache")
async def reset_prefix_cache(models: Models) -> Response:
    """Drop every served model's cached KV blocks (blocks in use stay); vLLM's route, for benchmarks that must
    start cold. 200 once every engine has done it."""
    for engine in models.engines.values():
        await engine.check_health()
        await engine.reset_prefix_cache()
    return Response(status_code=200)


@router.get("/v1/models")
async def models(served: Models) -> ModelList:
    """Every served model, each followed by its LoRA adapters; `root` is a hub id, or the name when the model is a
    path on this server (unless --show-model-paths)."""
    cards = []
    shown = served.lora_paths.shown
    for engine in served.engines.values():
        config = engine.model_config
        name = config.served_model_name
        cards.append(ModelCard(id=name, root=shown(config.model, name), max_model_len=config.max_model_len))
        cards += [
            ModelCard(id=lora.lora_name, root=shown(lora.lora_path, lora.lora_name), parent=name,
                      max_model_len=config.max_model_len)
            for lora in engine.loras.adapters.values()
        ]
    return ModelList(data=cards)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, models: Models) -> TokenizeResponse:
    engine = models.get(body.model)
    if body.messages is not None:
        text, _ = await offload(render_chat, engine.tokenizer, body.messages, engine.input_processor.mm.processor,
                                body.add_generation_prompt)
        add_special_tokens = bool(body.add_special_tokens)
    else:
        text = body.prompt
        add_special_tokens = body.add_special_tokens is not False
    tokens = await offload(encode_fitting, engine, text, "prompt" if body.messages is None else "messages",
                           add_special_tokens)
    return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=engine.model_config.max_model_len)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, models: Models) -> DetokenizeResponse:
    engine = models.get(body.model)
    await offload(check_vocab, body.tokens, engine.model_config.vocab_size, param="tokens")
    return DetokenizeResponse(prompt=await offload(engine.tokenizer.decode, body.tokens))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, raw_request: Request, models: Models) -> Response:
    engine = models.for_route(body.model, "/v1/completions", ("generate",))
    await engine.check_health()
    return await create_completion(models, engine, body, raw_request)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, raw_request: Request, models: Models) -> Response:
    engine = models.for_route(body.model, "/v1/chat/completions", ("generate",))
    await engine.check_health()
    return await create_chat_completion(models, engine, body, raw_request)


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

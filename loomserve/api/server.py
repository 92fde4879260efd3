"""The FastAPI app: the engine's lifetime, the routes, the API-key check and OpenAI-shaped errors."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from loomserve import __version__
from loomserve.api.body_limit import BodySizeLimitMiddleware
from loomserve.api.chat import TemplateInputs, chat_prompt
from loomserve.api.docs import offline_docs_router
from loomserve.api.errors import APIError, error_response, exception_response
from loomserve.api.frontend_flags import FrontendOptions
from loomserve.api.log_stats import LoggingStatLogger, log_periodically, log_stats_interval
from loomserve.api.metrics import CONTENT_TYPE
from loomserve.api.metrics_group import MetricsGroup
from loomserve.api.offload import offload
from loomserve.api.openapi import install_openapi
from loomserve.api.orca import orca_headers
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
from loomserve.api.protocol_transcription import TRANSCRIPTION_OPENAPI
from loomserve.api.request_id import request_id_headers
from loomserve.api.response_headers import ResponseHeadersMiddleware
from loomserve.api.response_store import ResponseStore
from loomserve.api.served_models import Models, ServedModels
from loomserve.api.server_load import ServerLoad, ServerLoadMiddleware
from loomserve.api.server_load import router as load_router
from loomserve.api.serving_chat import create_chat_completion
from loomserve.api.serving_chat_batch import router as chat_batch_router
from loomserve.api.serving_completion import create_completion
from loomserve.api.serving_lora import load_startup_adapters
from loomserve.api.serving_lora import router as lora_router
from loomserve.api.serving_responses import router as responses_router
from loomserve.api.serving_transcription import create_transcription, refuse_speech_to_text
from loomserve.api.tokenizer_info import router as tokenizer_info_router
from loomserve.api.unsupported_fields import extra_field_message
from loomserve.platform.async_llm import EngineDeadError
from loomserve.platform.gc_heap import freeze_startup_heap

OPEN_PATHS = frozenset({"/health", "/metrics", "/version"})  # served without an API key

router = APIRouter()


def build_app(models: ServedModels, metrics: MetricsGroup, options: FrontendOptions | None = None,
              stats: Sequence[LoggingStatLogger] = ()) -> FastAPI:
    """The app over engines already started (the caller's to start; the app shuts them down when it stops): at
    start-up it loads the `--lora-modules` adapters and starts the periodic stats line of `stats`."""
    options = options or FrontendOptions()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.models = models
        stats_task = None
        try:
            await load_startup_adapters(models, options.lora_modules)
            await models.join_adapters()
            freeze_startup_heap()
            if options.log_stats and stats:
                stats_task = asyncio.get_running_loop().create_task(log_periodically(stats, log_stats_interval()))
            yield
        except Exception as exc:
            app.state.startup_error = exc  # the CLI reports it in one line
            raise
        finally:
            if stats_task is not None:
                stats_task.cancel()
            models.shutdown()

    # The app (not uvicorn) takes --root-path: paths with and without the prefix both answer, as vLLM's do.
    app = FastAPI(title="loomserve", version=__version__, lifespan=lifespan, root_path=options.root_path,
                  docs_url=None if options.enable_offline_docs else "/docs")
    app.state.metrics = metrics
    app.state.chat_options = options.chat
    app.state.features = options.features
    app.state.response_store = ResponseStore() if options.features.responses_store else None
    app.state.startup_error = None
    app.include_router(router)
    app.include_router(pooling_router)
    app.include_router(lora_router)
    app.include_router(chat_batch_router)
    app.include_router(responses_router)
    if options.enable_offline_docs:
        app.include_router(offline_docs_router())
    _add_vllm_routes(app, options)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    for handled in (APIError, EngineDeadError, Exception):
        app.add_exception_handler(handled, _api_error)
    install_openapi(app, models.limits)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=models.limits.max_request_body_bytes)
    if options.api_keys:  # runs before the body limit: no body is read for a request without a key
        app.add_middleware(APIKeyMiddleware, api_keys=options.api_keys)
    _add_vllm_middleware(app, metrics, options)
    app.add_middleware(CORSMiddleware, allow_origins=options.allowed_origins, allow_methods=options.allowed_methods,
                       allow_headers=options.allowed_headers, allow_credentials=options.allow_credentials)
    return app


def _add_vllm_routes(app: FastAPI, options: FrontendOptions) -> None:
    """vLLM's optional routes: /tokenizer_info and /load."""
    if options.features.tokenizer_info_endpoint:
        app.include_router(tokenizer_info_router)
    if options.features.server_load_tracking:
        app.state.server_load = ServerLoad()
        app.include_router(load_router)


def _add_vllm_middleware(app: FastAPI, metrics: MetricsGroup, options: FrontendOptions) -> None:
    """Outside the API-key check, so every answer has them: /load's count, X-Request-Id, ORCA load reports."""
    features = options.features
    if features.server_load_tracking:
        app.add_middleware(ServerLoadMiddleware, load=app.state.server_load)
    if metrics.loggers:  # reports on the main model, the first
        orca = orca_headers(metrics.registry, metrics.loggers[0].model_name)
        app.add_middleware(ResponseHeadersMiddleware, headers_for=orca)
    if features.request_id_headers:
        app.add_middleware(ResponseHeadersMiddleware, headers_for=request_id_headers)


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
async def tokenize(body: TokenizeRequest, request: Request, models: Models) -> TokenizeResponse:
    """The prompt's token ids as the engine would get them: chat messages rendered, their media loaded and each
    placeholder expanded to the model's tokens; `return_token_strs` adds each token's string."""
    engine = models.get(body.model)
    if body.messages is not None:
        inputs = TemplateInputs.of(body, request.app.state.chat_options.content_format)
        prompt = await chat_prompt(engine, body.messages, models.limits.media_budget, inputs,
                                   bool(body.add_special_tokens))
        tokens = prompt.token_ids
    else:
        tokens = await offload(encode_fitting, engine, body.prompt, "prompt", body.add_special_tokens is not False)
    strs = await offload(engine.tokenizer.convert_ids_to_tokens, tokens) if body.return_token_strs else None
    return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=engine.model_config.max_model_len,
                            token_strs=strs)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, models: Models) -> DetokenizeResponse:
    engine = models.get(body.model)
    await offload(check_vocab, body.tokens, engine.model_config.vocab_size, param="tokens")
    return DetokenizeResponse(prompt=await offload(engine.tokenizer.decode, body.tokens))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, raw_request: Request, models: Models) -> Response:
    engine = await models.for_generation(body.model, "/v1/completions")
    refuse_speech_to_text(engine, "/v1/completions")
    await engine.check_health()
    return await create_completion(models, engine, body, raw_request)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, raw_request: Request, models: Models) -> Response:
    engine = await models.for_generation(body.model, "/v1/chat/completions")
    await engine.check_health()
    return await create_chat_completion(models, engine, body, raw_request)


@router.post("/v1/audio/transcriptions", openapi_extra=TRANSCRIPTION_OPENAPI)
@router.post("/v1/audio/translations", openapi_extra=TRANSCRIPTION_OPENAPI)
async def audio_transcriptions(raw_request: Request, models: Models) -> Response:
    """Multipart form: file, model, language, prompt, response_format, temperature, timestamp_granularities[]."""
    return await create_transcription(models, raw_request)


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
    if first["type"] == "extra_forbidden":  # no silent success: a field not implemented here is named
        return error_response(400, extra_field_message([str(part) for part in first["loc"][1:]]), where[0])
    message = "; ".join(f"{loc}: {e['msg']}" for loc, e in zip(where, errors, strict=True))
    param = str(first["loc"][1]) if len(first["loc"]) > 1 else None
    return error_response(400, message, param)


class APIKeyMiddleware:
    """401 on every path but /health, /metrics and /version without `Authorization: Bearer <key>` (any key)."""

    def __init__(self, app: ASGIApp, api_keys: Sequence[str]) -> None:
        self.app = app
        self.expected = [f"Bearer {key}".encode() for key in api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _route_path(scope) not in OPEN_PATHS and not self._authorized(scope):
            response = error_response(401, "Invalid or missing API key: send `Authorization: Bearer <key>`")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        return any([hmac.compare_digest(given, expected) for expected in self.expected])  # no early exit: timing


def _route_path(scope: Scope) -> str:
    """The path without the --root-path prefix, which uvicorn puts in front of every path it hands the app."""
    root, path = scope.get("root_path", ""), scope["path"]
    return path[len(root):] if root and path.startswith(root) else path

"""POST /invocations (SageMaker's single entry point), as vLLM dispatches it: the body goes to the first route, in
vLLM's order, whose request shape it fits among those the named model (absent: the main one) serves: chat
completions, completions, embeddings, classification, score, rerank, pooling. A body that fits none is a 400 naming
the shapes expected."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from loomserve.api.errors import APIError
from loomserve.api.protocol import ChatCompletionRequest, CompletionRequest
from loomserve.api.protocol_pooling import (
    ClassificationRequest,
    EmbeddingRequest,
    PoolingAPIRequest,
    RerankRequest,
    ScoreRequest,
)
from loomserve.api.served_models import ServedModels
from loomserve.api.serving_embedding import create_embedding
from loomserve.api.serving_pooling import create_classification
from loomserve.api.serving_pooling_api import create_pooling
from loomserve.api.serving_score import create_rerank, create_score

Handler = Callable[[ServedModels, Any, Request], Awaitable[Response]]


async def _rerank(models: ServedModels, body: RerankRequest, raw_request: Request) -> Response:
    return await create_rerank(models, body, raw_request, "/rerank")


_SCORING: list[tuple[type[BaseModel], Handler]] = [
    (ScoreRequest, create_score), (RerankRequest, _rerank), (PoolingAPIRequest, create_pooling)]
# the model's task -> the request shapes it takes, earlier ones first (vLLM's INVOCATION_TYPES order)
ROUTES: dict[str, list[tuple[type[BaseModel], Handler]]] = {
    "embed": [(EmbeddingRequest, create_embedding), *_SCORING],
    "classify": [(ClassificationRequest, create_classification), *_SCORING],
}


def _generation_routes() -> list[tuple[type[BaseModel], Handler]]:
    """The generation routes as server.py serves them (imported here at call time: server.py mounts this module's
    router)."""
    from loomserve.api.server import chat_completions, completions

    return [(ChatCompletionRequest, lambda models, body, raw: chat_completions(body, raw, models)),
            (CompletionRequest, lambda models, body, raw: completions(body, raw, models))]


async def invoke(models: ServedModels, raw_request: Request) -> Response:
    try:
        data = json.loads(await raw_request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(f"Malformed JSON in the request body: {exc}") from exc
    if not isinstance(data, dict):
        raise APIError("The request body must be a JSON object")
    engine = models.get(data.get("model") if isinstance(data.get("model"), str) else None)
    routes = ROUTES[engine.model_config.task] if engine.model_config.task != "generate" else _generation_routes()
    for request_type, handler in routes:
        try:
            body = request_type.model_validate(data)
        except ValidationError:
            continue
        return await handler(models, body, raw_request)
    expected = ", ".join(request_type.__name__ for request_type, _ in routes)
    raise APIError(f"Cannot find a route for this request: {engine.model_config.served_model_name} takes one of "
                   f"{expected}")

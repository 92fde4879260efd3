"""The pooling routes, mounted next to the generation routes: embeddings (OpenAI and Cohere v2), classification,
pooling, score, rerank; and SageMaker's /invocations, which dispatches to any route."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from loomserve.api.protocol_cohere import CohereEmbedRequest
from loomserve.api.protocol_pooling import (
    ClassificationRequest,
    EmbeddingRequest,
    PoolingAPIRequest,
    RerankRequest,
    ScoreRequest,
)
from loomserve.api.served_models import Models
from loomserve.api.serving_cohere import create_cohere_embedding
from loomserve.api.serving_embedding import create_embedding
from loomserve.api.serving_invocations import invoke
from loomserve.api.serving_pooling import create_classification
from loomserve.api.serving_pooling_api import create_pooling
from loomserve.api.serving_score import create_rerank, create_score

pooling_router = APIRouter()


@pooling_router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, raw_request: Request, models: Models) -> Response:
    return await create_embedding(models, body, raw_request)


@pooling_router.post("/classify")
async def classify(body: ClassificationRequest, raw_request: Request, models: Models) -> Response:
    return await create_classification(models, body, raw_request)


@pooling_router.post("/v2/embed")
async def cohere_embed(body: CohereEmbedRequest, raw_request: Request, models: Models) -> Response:
    return await create_cohere_embedding(models, body, raw_request)


@pooling_router.post("/pooling")
async def pooling(body: PoolingAPIRequest, raw_request: Request, models: Models) -> Response:
    return await create_pooling(models, body, raw_request)


@pooling_router.post("/score")
@pooling_router.post("/v1/score")
async def score(body: ScoreRequest, raw_request: Request, models: Models) -> Response:
    return await create_score(models, body, raw_request)


@pooling_router.post("/rerank")
@pooling_router.post("/v1/rerank")
@pooling_router.post("/v2/rerank")
async def rerank(body: RerankRequest, raw_request: Request, models: Models) -> Response:
    return await create_rerank(models, body, raw_request, raw_request.url.path)


@pooling_router.post("/invocations")
async def invocations(raw_request: Request, models: Models) -> Response:
    return await invoke(models, raw_request)

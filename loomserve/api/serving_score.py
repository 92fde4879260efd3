"""POST /score, /v1/score and the rerank routes (/rerank, /v1/rerank, /v2/rerank): one score per text pair, from a
cross-encoder's head or a bi-encoder's cosine similarity; reranking orders documents by their score."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response

from loomserve.api.errors import APIError
from loomserve.api.offload import json_response, offload
from loomserve.api.protocol_pooling import (
    PoolingUsage,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
    ScoreData,
    ScoreRequest,
    ScoreResponse,
)
from loomserve.api.served_models import ServedModels
from loomserve.api.serving import random_id
from loomserve.api.serving_pooling import bad_request, check_texts_fit, pool_all, validate_all
from loomserve.platform.async_llm import AsyncLLM
from loomserve.pooling.params import PoolingParams
from loomserve.pooling.scoring import ScorePlan, plan_scores, rerank_order

SCORE_TASKS = ("classify", "embed")


async def create_score(models: ServedModels, body: ScoreRequest, raw_request: Request) -> Response:
    engine = models.for_route(body.model, "/v1/score", SCORE_TASKS)
    call_id = random_id("score")
    for param, texts in (("text_1", body.text_1), ("text_2", body.text_2)):
        models.limits.check_inputs(len(texts) if isinstance(texts, list) else 1, param)
    plan = await offload(_plan, engine, body, body.text_1, body.text_2, "text_2")
    scores = await _run(models, engine, plan, call_id, raw_request, body.cache_salt)
    if scores is None:
        return Response(status_code=499)  # the client left; nobody reads this
    data = [ScoreData(index=i, score=score) for i, score in enumerate(scores)]
    response = ScoreResponse(id=call_id, model=engine.model_config.served_model_name, data=data,
                             usage=PoolingUsage.of(plan.num_tokens))
    return await json_response(response, long_list="data")


async def create_rerank(models: ServedModels, body: RerankRequest, raw_request: Request, route: str) -> Response:
    engine = models.for_route(body.model, route, SCORE_TASKS)
    documents = body.document_texts
    if not documents:
        raise APIError("`documents` must not be empty", param="documents")
    models.limits.check_inputs(len(documents), "documents")
    call_id = random_id("rerank")
    plan = await offload(_plan, engine, body, body.query, documents, "documents")
    scores = await _run(models, engine, plan, call_id, raw_request, body.cache_salt)
    if scores is None:
        return Response(status_code=499)  # the client left; nobody reads this
    results = [
        RerankResult(index=i, relevance_score=scores[i],
                     document=RerankDocument(text=documents[i]) if body.return_documents else None)
        for i in rerank_order(scores, body.top_n)
    ]
    response = RerankResponse(id=call_id, model=engine.model_config.served_model_name,
                              usage=RerankUsage(prompt_tokens=plan.num_tokens, total_tokens=plan.num_tokens),
                              results=results)
    return await json_response(response, long_list="results")


def _plan(engine: AsyncLLM, body: ScoreRequest | RerankRequest, text_1: str | list[str], text_2: str | list[str],
          param: str) -> ScorePlan:
    """The score requests, each side cut to its max_tokens_per_query / max_tokens_per_doc, tokenized and checked
    (blocking: the front end's pool)."""
    inputs, truncate = engine.pooling_inputs, body.truncate_prompt_tokens
    with bad_request("truncate_prompt_tokens"):
        inputs.truncation(truncate)
    sides = []
    for texts, field in ((text_1, "max_tokens_per_query"), (text_2, "max_tokens_per_doc")):
        with bad_request(field):
            cut = inputs.truncate_texts([texts] if isinstance(texts, str) else texts, getattr(body, field), field)
        sides.append(cut[0] if isinstance(texts, str) else cut)
    for texts in sides:
        check_texts_fit(engine, [texts] if isinstance(texts, str) else texts, truncate, param)
    with bad_request(param):
        plan = plan_scores(inputs, *sides, truncate, PoolingParams(activation=body.use_activation))
    validate_all(engine, plan.requests, plan.labels, param)
    return plan


async def _run(models: ServedModels, engine: AsyncLLM, plan: ScorePlan, call_id: str, raw_request: Request,
               cache_salt: str | None) -> list[float] | None:
    outputs = await pool_all(models, engine, plan.requests, call_id, raw_request, cache_salt)
    return None if outputs is None else plan.scores([o.outputs.data for o in outputs])

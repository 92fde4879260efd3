"""POST /v2/embed: Cohere's embed API v2 on an embedding model, as vLLM serves it. `input_type` picks the checkpoint's
prompt (one of that name; search_query / search_document: its query / document prompt); `truncate` END keeps an
input's start, START its end, NONE refuses inputs over the limit (`max_tokens`, else the context); each vector comes
back in every requested embedding type."""

from __future__ import annotations

import torch
from fastapi import Request
from fastapi.responses import Response

from loomserve.api.errors import APIError
from loomserve.api.offload import json_response, offload
from loomserve.api.pooling_encoding import typed_embeddings
from loomserve.api.protocol import ChatMessage
from loomserve.api.protocol_cohere import CohereBilledUnits, CohereEmbedRequest, CohereEmbedResponse, CohereMeta
from loomserve.api.served_models import ServedModels
from loomserve.api.serving import random_id
from loomserve.api.serving_pooling import (
    PreparedInputs,
    bad_request,
    pool_all,
    prepare_conversations,
    prepare_texts,
)
from loomserve.platform.async_llm import AsyncLLM
from loomserve.pooling.inputs import DOCUMENT_PROMPTS, QUERY_PROMPTS
from loomserve.pooling.params import PoolingParams

_ROLE_PROMPTS = {"search_query": QUERY_PROMPTS, "search_document": DOCUMENT_PROMPTS}


async def create_cohere_embedding(models: ServedModels, body: CohereEmbedRequest, raw_request: Request) -> Response:
    engine = models.for_route(body.model, "/v2/embed", ("embed",))
    inputs = engine.pooling_inputs
    with bad_request("output_dimension"):
        params = inputs.params(PoolingParams(dimensions=body.output_dimension))
    prompt_name = _prompt_name(engine, body.input_type)
    limit = min(body.max_tokens or inputs.max_model_len, inputs.max_model_len)
    if body.texts is not None:
        models.limits.check_inputs(len(body.texts), "texts")
        prepared = await _texts(engine, body, params, prompt_name, limit)
    else:
        conversations = _conversations(body)
        models.limits.check_inputs(len(conversations), "inputs" if body.inputs is not None else "images")
        prepared = await prepare_conversations(engine, conversations, params, limit, prompt_name)
    call_id = random_id("embd")
    outputs = await pool_all(models, engine, prepared.requests, call_id, raw_request, None, prepared.mm_items)
    if outputs is None:
        return Response(status_code=499)  # the client left; nobody reads this
    with bad_request("embedding_types"):
        embeddings = await offload(_typed, prepared, outputs, body.embedding_types)
    meta = CohereMeta(billed_units=CohereBilledUnits(input_tokens=prepared.num_tokens))
    return await json_response(CohereEmbedResponse(id=call_id, embeddings=embeddings, texts=body.texts, meta=meta))


def _prompt_name(engine: AsyncLLM, input_type: str | None) -> str | None:
    """The checkpoint's prompt for `input_type`: one of that name, else its query / document prompt for
    search_query / search_document, else none."""
    inputs = engine.pooling_inputs
    if input_type is None:
        return None
    if input_type in inputs.pooler_config.prompts:
        return input_type
    return inputs.role_prompt_name(_ROLE_PROMPTS.get(input_type, ()))


async def _texts(engine: AsyncLLM, body: CohereEmbedRequest, params: PoolingParams, prompt_name: str | None,
                 limit: int) -> PreparedInputs:
    texts: list = body.texts
    if body.truncate != "END":  # NONE: whole, refused over the limit; START: the last `limit` tokens
        ids = await offload(engine.pooling_inputs.tokenize, texts, None, prompt_name)
        over = next((i for i, t in enumerate(ids) if len(t) > limit), None)
        if body.truncate == "NONE" and over is not None:
            raise APIError(f"texts {over} has {len(ids[over])} tokens, more than {limit}; set truncate to END or "
                           "START to cut it", param="texts")
        texts, prompt_name = [t[-limit:] for t in ids], None
    return await prepare_texts(engine, texts, params, limit, prompt_name)


def _conversations(body: CohereEmbedRequest) -> list[list[ChatMessage]]:
    """Each of `images` or `inputs` as a one-message chat conversation."""
    if body.images is not None:
        return [[ChatMessage(role="user", content=[{"type": "image_url", "image_url": {"url": url}}])]
                for url in body.images]
    return [[ChatMessage(role="user", content=[part.model_dump(exclude_none=True) for part in item.content])]
            for item in body.inputs]


def _typed(prepared: PreparedInputs, outputs: list, embedding_types: list[str]) -> dict[str, list]:
    return typed_embeddings(torch.stack(prepared.outputs(outputs)), embedding_types)

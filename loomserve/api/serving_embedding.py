"""POST /v1/embeddings: texts, token ids or chat messages (with images for CLIP / SigLIP) -> one pooled vector each,
as float lists, base64 (`embed_dtype`, `endianness`) or vLLM's binary body; and the answer every vector-returning
route (/v1/embeddings, /pooling) builds from its vectors."""

from __future__ import annotations

from collections.abc import Callable

import torch
from fastapi import Request
from fastapi.responses import Response

from loomserve.api.offload import json_response, offload
from loomserve.api.pooling_encoding import bytes_response, encode_json
from loomserve.api.protocol_pooling import (
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EncodedRequest,
    PoolingListResponse,
    PoolingUsage,
)
from loomserve.api.served_models import ServedModels
from loomserve.api.serving import random_id
from loomserve.api.serving_pooling import bad_request, pool_all, prepare_inputs
from loomserve.platform.async_llm import AsyncLLM
from loomserve.pooling.params import PoolingParams


async def create_embedding(models: ServedModels, body: EmbeddingRequest, raw_request: Request) -> Response:
    engine = models.for_route(body.model, "/v1/embeddings", ("embed",))
    inputs = engine.pooling_inputs
    with bad_request("dimensions"):
        params = inputs.params(embedding_params(body))
    with bad_request("truncate_prompt_tokens"):
        inputs.truncation(body.truncate_prompt_tokens)
    with bad_request("prompt_name"):
        inputs.pooler_config.prompt(body.prompt_name)
    return await encode_call(models, engine, body, params, raw_request, "embd", EmbeddingResponse,
                             lambda i, value: EmbeddingData(index=i, embedding=value), body.prompt_name)


def embedding_params(body: EncodedRequest, **extra: object) -> PoolingParams:
    """The request's embedding parameters; `use_activation` is vLLM's newer name of `normalize`."""
    normalize = body.normalize if body.normalize is not None else body.use_activation
    return PoolingParams(dimensions=body.dimensions, normalize=normalize, **extra)


async def encode_call(models: ServedModels, engine: AsyncLLM, body: EncodedRequest, params: PoolingParams,
                      raw_request: Request, id_prefix: str, response_type: type[PoolingListResponse],
                      item: Callable[[int, object], object], prompt_name: str | None = None) -> Response:
    """Pool the body's inputs with `params` and answer with one `item(index, encoded output)` per input, or the
    outputs' bytes with encoding_format bytes / bytes_only."""
    prepared = await prepare_inputs(engine, body, params, models.limits, prompt_name)
    call_id = random_id(id_prefix)
    outputs = await pool_all(models, engine, prepared.requests, call_id, raw_request, body.cache_salt,
                             prepared.mm_items)
    if outputs is None:
        return Response(status_code=499)  # the client left; nobody reads this
    vectors = await offload(prepared.outputs, outputs)
    usage = PoolingUsage.of(prepared.num_tokens)
    model = engine.model_config.served_model_name
    if body.encoding_format in ("bytes", "bytes_only"):
        envelope = response_type(id=call_id, model=model, usage=usage, data=[]).model_dump(exclude={"data", "object"})
        return await offload(bytes_response, vectors, body.encoding_format, body.embed_dtype, body.endianness,
                             envelope)
    data = await offload(_items, vectors, body, item)
    return await json_response(response_type(id=call_id, model=model, data=data, usage=usage), long_list="data")


def _items(vectors: list[torch.Tensor], body: EncodedRequest, item: Callable[[int, object], object]) -> list:
    return [item(i, encode_json(v, body.encoding_format, body.embed_dtype, body.endianness))
            for i, v in enumerate(vectors)]

"""POST /v1/embeddings: texts, token ids or chat messages (with images for CLIP / SigLIP) -> one pooled vector each,
as float lists or base64 float32."""

from __future__ import annotations

import base64

import numpy as np
import torch
from fastapi import Request
from fastapi.responses import Response

from loomserve.api.offload import json_response, offload
from loomserve.api.pooling_messages import messages_prompt
from loomserve.api.protocol_pooling import EmbeddingData, EmbeddingRequest, EmbeddingResponse, PoolingUsage
from loomserve.api.served_models import ServedModels
from loomserve.api.serving import random_id
from loomserve.api.serving_pooling import PoolingRequests, bad_request, input_list, pool_all, tokenize_all, validate_all
from loomserve.modalities.inputs import MultiModalItem
from loomserve.platform.async_llm import AsyncLLM
from loomserve.pooling.inputs import PoolingPrompt, expand_media
from loomserve.pooling.outputs import PoolingOutput, PoolingRequestOutput
from loomserve.pooling.params import PoolingParams


async def create_embedding(models: ServedModels, body: EmbeddingRequest, raw_request: Request) -> Response:
    engine = models.for_route(body.model, "/v1/embeddings", ("embed",))
    inputs = engine.pooling_inputs
    prompts = ([await messages_prompt(engine, body.messages)] if body.messages is not None
               else input_list(body.input, models.limits))
    with bad_request("dimensions"):
        params = inputs.params(PoolingParams(dimensions=body.dimensions, normalize=body.normalize))
    with bad_request("truncate_prompt_tokens"):
        inputs.truncation(body.truncate_prompt_tokens)
    with bad_request("prompt_name"):
        inputs.pooler_config.prompt(body.prompt_name)
    mm_items = None
    if body.messages is None:
        requests = await tokenize_all(engine, prompts, params, body.truncate_prompt_tokens, body.prompt_name,
                                      body.add_special_tokens)
    else:
        requests, mm_items = await offload(_media_requests, engine, prompts, params, body)
    call_id = random_id("embd")
    outputs = await pool_all(models, engine, requests, call_id, raw_request, body.cache_salt, mm_items)
    if outputs is None:
        return Response(status_code=499)  # the client left; nobody reads this
    data = await offload(_embedding_data, outputs, body.encoding_format)
    usage = PoolingUsage.of(sum(len(ids) for ids, _ in requests))
    response = EmbeddingResponse(id=call_id, model=engine.model_config.served_model_name, data=data, usage=usage)
    return await json_response(response, long_list="data")


def _media_requests(engine: AsyncLLM, prompts: list[PoolingPrompt], params: PoolingParams,
                    body: EmbeddingRequest) -> tuple[PoolingRequests, list[list[MultiModalItem]]]:
    """The messages' prompt tokenized, its image preprocessed and the result checked (on the front end's pool)."""
    token_ids = engine.pooling_inputs.tokenize(prompts, body.truncate_prompt_tokens, body.prompt_name,
                                               body.add_special_tokens)
    with bad_request("messages"):
        token_ids, mm_items = expand_media(engine.input_processor.mm, prompts, token_ids)
    requests = [(ids, params) for ids in token_ids]
    validate_all(engine, requests, [f"input {i}" for i in range(len(requests))], "input")
    return requests, mm_items


def _embedding_data(outputs: list[PoolingRequestOutput[PoolingOutput]], encoding_format: str) -> list[EmbeddingData]:
    return [EmbeddingData(index=i, embedding=_encode(out.outputs.data, encoding_format))
            for i, out in enumerate(outputs)]


def _encode(vector: torch.Tensor, encoding_format: str) -> list[float] | str:
    """float: a JSON list; base64: little-endian float32 bytes, as OpenAI's API sends them."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.tolist()

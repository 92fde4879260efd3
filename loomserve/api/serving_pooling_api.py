"""POST /pooling (vLLM's): the model's pooled output for a `task` it serves, the default being its own: `embed` (one
vector per input), `token_embed` (one vector per token) or `classify` (the head's probabilities). A task the model
does not serve is a 400 naming the ones it does."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response

from loomserve.api.errors import APIError
from loomserve.api.protocol_pooling import PoolingAPIRequest, PoolingData, PoolingResponse
from loomserve.api.served_models import ServedModels
from loomserve.api.serving_embedding import embedding_params, encode_call
from loomserve.api.serving_pooling import bad_request
from loomserve.pooling.params import PoolingParams

# the model's task -> the /pooling tasks it serves
POOLING_TASKS = {"embed": ("embed", "token_embed"), "classify": ("classify",)}


async def create_pooling(models: ServedModels, body: PoolingAPIRequest, raw_request: Request) -> Response:
    engine = models.for_route(body.model, "/pooling", tuple(POOLING_TASKS))
    inputs = engine.pooling_inputs
    model_task = engine.model_config.task
    task = body.task or model_task
    if task not in POOLING_TASKS[model_task]:
        raise APIError(f"Task {task} is not supported by {engine.model_config.served_model_name}; it serves "
                       f"{', '.join(POOLING_TASKS[model_task])}", param="task")
    with bad_request("truncate_prompt_tokens"):
        inputs.truncation(body.truncate_prompt_tokens)
    with bad_request("dimensions"):
        params = inputs.params(task_params(body, task))
    return await encode_call(models, engine, body, params, raw_request, "pool", PoolingResponse,
                             lambda i, value: PoolingData(index=i, data=value))


def task_params(body: PoolingAPIRequest, task: str) -> PoolingParams:
    if task == "classify":
        return PoolingParams(activation=body.use_activation)
    return embedding_params(body, pooling_type="ALL" if task == "token_embed" else None)

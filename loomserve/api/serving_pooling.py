"""What the pooling routes share: input lists, ValueErrors as 400s naming their field, running a call's requests
on one engine (abandoned when the client leaves), and POST /classify."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from loomserve.api.errors import APIError
from loomserve.api.protocol_pooling import (
    ClassificationData,
    ClassificationRequest,
    ClassificationResponse,
    PoolingUsage,
)
from loomserve.api.served_models import ServedModels
from loomserve.api.serving import random_id
from loomserve.api.streaming import run_unless_disconnected
from loomserve.modalities.inputs import MultiModalItem
from loomserve.platform.async_llm import AsyncLLM
from loomserve.pooling.inputs import PoolingPrompt
from loomserve.pooling.outputs import PoolingOutput, PoolingRequestOutput
from loomserve.pooling.params import PoolingParams

PoolingRequests = list[tuple[list[int], PoolingParams]]


@contextmanager
def bad_request(param: str | None) -> Iterator[None]:
    """A ValueError inside (from the pooling inputs' checks) becomes a 400 about `param`."""
    try:
        yield
    except ValueError as exc:
        raise APIError(str(exc), param=param) from exc


def input_list(value: str | list[str] | list[int] | list[list[int]], param: str = "input") -> list[PoolingPrompt]:
    """One string, strings, one token-id list or token-id lists -> a non-empty list of prompts."""
    if isinstance(value, str) or (value and isinstance(value[0], int)):
        return [value]
    if not value:
        raise APIError(f"`{param}` must not be empty: give at least one text or token-id list", param=param)
    return list(value)


def validate_all(engine: AsyncLLM, requests: PoolingRequests, labels: Sequence[str], param: str) -> None:
    """400 for the first request the model cannot pool, before any of them starts."""
    with bad_request(param):
        for (token_ids, params), label in zip(requests, labels, strict=True):
            engine.pooling_inputs.validate(token_ids, params, label)


async def pool_all(
    engine: AsyncLLM,
    requests: PoolingRequests,
    call_id: str,
    raw_request: Request,
    mm_items: list[list[MultiModalItem]] | None = None,
) -> list[PoolingRequestOutput[PoolingOutput]] | None:
    """Every request's output, in order (with its media items, if given); None if the client left first (its
    requests are then aborted)."""
    await engine.check_health()
    items = mm_items or [None] * len(requests)
    work = asyncio.gather(*(engine.encode(ids, params, f"{call_id}-{i}", media)
                            for i, ((ids, params), media) in enumerate(zip(requests, items, strict=True))))
    finished, outputs = await run_unless_disconnected(raw_request, work)
    return outputs if finished else None


async def create_classification(models: ServedModels, body: ClassificationRequest, raw_request: Request) -> Response:
    engine = models.for_route(body.model, "/classify", ("classify",))
    inputs = engine.pooling_inputs
    prompts = input_list(body.input)
    with bad_request("truncate_prompt_tokens"):
        inputs.truncation(body.truncate_prompt_tokens)
    params = inputs.params()
    requests = [(ids, params) for ids in inputs.tokenize(prompts, body.truncate_prompt_tokens)]
    validate_all(engine, requests, [f"input {i}" for i in range(len(requests))], "input")
    call_id = random_id("classify")
    outputs = await pool_all(engine, requests, call_id, raw_request)
    if outputs is None:
        return Response(status_code=499)  # the client left; nobody reads this
    labels = getattr(engine.model_config.hf_config, "id2label", None) or {}
    data = []
    for i, out in enumerate(outputs):
        probs = out.outputs.data.tolist()
        best = max(range(len(probs)), key=probs.__getitem__)
        data.append(ClassificationData(index=i, label=labels.get(best), probs=probs, num_classes=len(probs)))
    usage = PoolingUsage.of(sum(len(ids) for ids, _ in requests))
    response = ClassificationResponse(id=call_id, model=engine.model_config.served_model_name, data=data, usage=usage)
    return JSONResponse(response.model_dump(mode="json"))

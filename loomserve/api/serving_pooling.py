"""What the pooling routes share: input lists within the limits, tokenizing off the event loop, ValueErrors as 400s
naming their field, running a call's requests on one engine (abandoned when the client leaves), and POST /classify."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from loomserve.api.errors import APIError
from loomserve.api.limits import ServerLimits, check_text_fits
from loomserve.api.offload import json_response, offload
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

_SEND_SLICE = 32  # engine requests a pooling call sends per turn of the event loop


@contextmanager
def bad_request(param: str | None) -> Iterator[None]:
    """A ValueError inside (from the pooling inputs' checks) becomes a 400 about `param`."""
    try:
        yield
    except ValueError as exc:
        raise APIError(str(exc), param=param) from exc


def input_list(value: str | list[str] | list[int] | list[list[int]], limits: ServerLimits,
               param: str = "input") -> list[PoolingPrompt]:
    """One string, strings, one token-id list or token-id lists -> a non-empty list of prompts, within
    --max-inputs-per-request."""
    if isinstance(value, str) or (value and isinstance(value[0], int)):
        return [value]
    if not value:
        raise APIError(f"`{param}` must not be empty: give at least one text or token-id list", param=param)
    limits.check_inputs(len(value), param)
    return list(value)


def check_texts_fit(engine: AsyncLLM, texts: Sequence[PoolingPrompt], truncate: int | None, param: str) -> None:
    """Without truncation, 400 for a text whose length alone shows it cannot fit the context (before tokenizing)."""
    if truncate is None:
        for text in texts:
            if isinstance(text, str):
                check_text_fits(text, engine.tokenizer, engine.model_config.max_model_len, param)


async def tokenize_all(engine: AsyncLLM, prompts: list[PoolingPrompt], params: PoolingParams, truncate: int | None,
                       *tokenize_args: Any) -> PoolingRequests:
    """Each prompt's engine request, tokenized and checked on the front end's pool; 400 for the first the model
    cannot pool."""
    def work() -> PoolingRequests:
        check_texts_fit(engine, prompts, truncate, "input")
        requests = [(ids, params) for ids in engine.pooling_inputs.tokenize(prompts, truncate, *tokenize_args)]
        validate_all(engine, requests, [f"input {i}" for i in range(len(requests))], "input")
        return requests

    return await offload(work)


def validate_all(engine: AsyncLLM, requests: PoolingRequests, labels: Sequence[str], param: str) -> None:
    """400 for the first request the model cannot pool, before any of them starts."""
    with bad_request(param):
        for (token_ids, params), label in zip(requests, labels, strict=True):
            engine.pooling_inputs.validate(token_ids, params, label)


async def pool_all(
    models: ServedModels, engine: AsyncLLM, requests: PoolingRequests, call_id: str, raw_request: Request,
    cache_salt: str | None, mm_items: list[list[MultiModalItem]] | None = None,
) -> list[PoolingRequestOutput[PoolingOutput]] | None:
    """Every request's output, in order (with its media items, if given); None if the client left first (its
    requests are then aborted). 429 when the model's queue has no room for them."""
    await engine.check_health()
    with models.admit(engine, len(requests)):
        work = _encode_all(engine, requests, call_id, cache_salt, mm_items)
        finished, outputs = await run_unless_disconnected(raw_request, work)
    return outputs if finished else None


async def _encode_all(engine: AsyncLLM, requests: PoolingRequests, call_id: str, cache_salt: str | None,
                      mm_items: list[list[MultiModalItem]] | None) -> list[PoolingRequestOutput[PoolingOutput]]:
    """Every request's output, in order. They are sent a slice at a time, the event loop serving other requests
    (and /health) between slices: sending thousands at once would hold it for seconds."""
    tasks = []
    try:
        for i, (ids, params) in enumerate(requests):
            media = mm_items[i] if mm_items else None
            tasks.append(asyncio.ensure_future(engine.encode(ids, params, f"{call_id}-{i}", cache_salt, media)))
            if i % _SEND_SLICE == _SEND_SLICE - 1:
                await asyncio.sleep(0.002)  # the slice's tasks send their requests; other callbacks get a turn
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()  # left early (client gone, a request failed): the rest are aborted


async def create_classification(models: ServedModels, body: ClassificationRequest, raw_request: Request) -> Response:
    engine = models.for_route(body.model, "/classify", ("classify",))
    inputs = engine.pooling_inputs
    prompts = input_list(body.input, models.limits)
    with bad_request("truncate_prompt_tokens"):
        inputs.truncation(body.truncate_prompt_tokens)
    requests = await tokenize_all(engine, prompts, inputs.params(), body.truncate_prompt_tokens)
    call_id = random_id("classify")
    outputs = await pool_all(models, engine, requests, call_id, raw_request, body.cache_salt)
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
    return await json_response(response, long_list="data")

"""What the pooling routes share: a body's input or chat messages as checked engine requests (tokenized off the event
loop, long inputs chunked), ValueErrors as 400s naming their field, running a call's requests on one engine
(abandoned when the client leaves), and POST /classify."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from fastapi import Request
from fastapi.responses import Response

from loomserve.api.errors import APIError
from loomserve.api.limits import ServerLimits, check_text_fits
from loomserve.api.offload import json_response, offload
from loomserve.api.pooling_messages import messages_prompt
from loomserve.api.protocol import ChatMessage
from loomserve.api.protocol_pooling import (
    ClassificationData,
    ClassificationRequest,
    ClassificationResponse,
    InputOrMessages,
    PoolingUsage,
)
from loomserve.api.served_models import ServedModels
from loomserve.api.serving import random_id
from loomserve.api.streaming import run_unless_disconnected
from loomserve.modalities.inputs import MultiModalItem
from loomserve.platform.async_llm import AsyncLLM
from loomserve.pooling.chunked import ChunkedRequests, PoolingRequests, split_long
from loomserve.pooling.inputs import PoolingPrompt, expand_media
from loomserve.pooling.outputs import PoolingOutput, PoolingRequestOutput
from loomserve.pooling.params import PoolingParams

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


@dataclass
class PreparedInputs:
    """A call's engine requests (with their media items) and how their outputs make one per input."""

    requests: PoolingRequests
    mm_items: list[list[MultiModalItem]] | None = None
    chunks: ChunkedRequests | None = None  # long inputs split for chunked processing

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids, _ in self.requests)

    def outputs(self, results: list[PoolingRequestOutput[PoolingOutput]]) -> list[torch.Tensor]:
        """The engine's results, in request order -> one output per input."""
        data = [out.outputs.data for out in results]
        return self.chunks.combine(data) if self.chunks is not None else data


async def prepare_inputs(engine: AsyncLLM, body: InputOrMessages, params: PoolingParams, limits: ServerLimits,
                         prompt_name: str | None = None) -> PreparedInputs:
    """The body's `input` (tokenized, long ones chunked when the model embeds in chunks) or its chat `messages`
    (rendered, media loaded) as checked engine requests; 400 for the first input the model cannot pool."""
    if body.messages is not None:
        return await prepare_conversations(engine, [body.messages], params, body.truncate_prompt_tokens, prompt_name,
                                           body.add_special_tokens, body.add_generation_prompt)
    return await prepare_texts(engine, input_list(body.input, limits), params, body.truncate_prompt_tokens,
                               prompt_name, body.add_special_tokens is not False)


async def prepare_texts(engine: AsyncLLM, prompts: list[PoolingPrompt], params: PoolingParams, truncate: int | None,
                        prompt_name: str | None = None, add_special_tokens: bool = True) -> PreparedInputs:
    """Texts or token-id lists as checked engine requests (long ones chunked when the model embeds in chunks)."""
    return await offload(_text_inputs, engine, prompts, params, truncate, prompt_name, add_special_tokens)


async def prepare_conversations(engine: AsyncLLM, conversations: list[list[ChatMessage]], params: PoolingParams,
                                truncate: int | None, prompt_name: str | None = None,
                                add_special_tokens: bool | None = None,
                                add_generation_prompt: bool = False) -> PreparedInputs:
    """Chat conversations, one input each, rendered (special tokens from the chat template unless
    `add_special_tokens`) with their media loaded, as checked engine requests."""
    rendered = [await messages_prompt(engine, messages, add_generation_prompt) for messages in conversations]
    templated = rendered[0][1]
    add_special = add_special_tokens if add_special_tokens is not None else not templated
    return await offload(_media_inputs, engine, [prompt for prompt, _ in rendered], params, truncate, prompt_name,
                         add_special)


def _text_inputs(engine: AsyncLLM, prompts: list[PoolingPrompt], params: PoolingParams, truncate: int | None,
                 prompt_name: str | None, add_special_tokens: bool) -> PreparedInputs:
    inputs = engine.pooling_inputs
    chunked = inputs.pooler_config.enable_chunked_processing and inputs.model_config.task == "embed"
    if not chunked:
        check_texts_fit(engine, prompts, truncate, "input")
    requests = [(ids, params) for ids in inputs.tokenize(prompts, truncate, prompt_name, add_special_tokens)]
    labels = [f"input {i}" for i in range(len(requests))]
    chunks = None
    if chunked and not params.returns_sequence:
        with bad_request("input"):
            chunks = split_long(requests, inputs.chunk_length(params), inputs.pooler_config.max_embed_len)
        requests, labels = chunks.requests, [f"input {i}" for i in chunks.owners]
    validate_all(engine, requests, labels, "input")
    return PreparedInputs(requests, chunks=chunks)


def _media_inputs(engine: AsyncLLM, prompts: list[PoolingPrompt], params: PoolingParams, truncate: int | None,
                  prompt_name: str | None, add_special_tokens: bool) -> PreparedInputs:
    """Rendered conversations tokenized, their media preprocessed and the results checked."""
    token_ids = engine.pooling_inputs.tokenize(prompts, truncate, prompt_name, add_special_tokens)
    with bad_request("messages"):
        token_ids, mm_items = expand_media(engine.input_processor.mm, prompts, token_ids)
    requests = [(ids, params) for ids in token_ids]
    validate_all(engine, requests, [f"conversation {i}" for i in range(len(requests))], "messages")
    return PreparedInputs(requests, mm_items)


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
    with bad_request("truncate_prompt_tokens"):
        inputs.truncation(body.truncate_prompt_tokens)
    prepared = await prepare_inputs(engine, body, inputs.params(PoolingParams(activation=body.use_activation)),
                                    models.limits)
    call_id = random_id("classify")
    outputs = await pool_all(models, engine, prepared.requests, call_id, raw_request, body.cache_salt,
                             prepared.mm_items)
    if outputs is None:
        return Response(status_code=499)  # the client left; nobody reads this
    labels = getattr(engine.model_config.hf_config, "id2label", None) or {}
    data = []
    for i, out in enumerate(prepared.outputs(outputs)):
        probs = out.tolist()
        best = max(range(len(probs)), key=probs.__getitem__)
        data.append(ClassificationData(index=i, label=labels.get(best), probs=probs, num_classes=len(probs)))
    usage = PoolingUsage.of(prepared.num_tokens)
    response = ClassificationResponse(id=call_id, model=engine.model_config.served_model_name, data=data, usage=usage)
    return await json_response(response, long_list="data")

"""POST /v1/completions: prompts -> engine requests -> an OpenAI text completion, whole or streamed."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from loomserve.api.beam_search import beam_search, beam_search_params
from loomserve.api.errors import APIError, error_body_for
from loomserve.api.logprobs import completion_logprobs, joined_logprobs, prompt_logprobs_json
from loomserve.api.offload import json_response, offload
from loomserve.api.prompt_embeds import embeds_prompts
from loomserve.api.prompts import Prompt, check_token_ids, encode_fitting
from loomserve.api.protocol import CompletionChoice, CompletionLogProbs, CompletionRequest, CompletionResponse
from loomserve.api.served_models import ServedModels
from loomserve.api.serving import (
    Delta,
    DeltaTracker,
    collect_final,
    lora_for,
    random_id,
    sampling_params,
)
from loomserve.api.stream_chunks import ChunkEnvelope
from loomserve.api.streaming import SSE_DONE, merge_async_iterators, run_unless_disconnected, sse
from loomserve.api.usage_report import UsageReport
from loomserve.platform.async_llm import AsyncLLM
from loomserve.platform.request import RequestOutput

logger = logging.getLogger(__name__)


@dataclass
class _Call:
    """One /v1/completions call: its prompts and the fixed fields of every chunk."""

    request: CompletionRequest
    echo_texts: list[str]
    model: str
    tokenizer: Any
    report: UsageReport
    id: str = field(default_factory=lambda: random_id("cmpl"))
    created: int = field(default_factory=lambda: int(time.time()))

    def decode(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def choice_index(self, prompt_index: int, output_index: int) -> int:
        return prompt_index * self.request.n + output_index

    def response(self, choices: list[CompletionChoice], **extra: Any) -> CompletionResponse:
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, **extra
        )


async def create_completion(
    models: ServedModels, engine: AsyncLLM, request: CompletionRequest, raw_request: Request
) -> Response:
    lora, model_name = await lora_for(engine, request.model)
    # with prompt_embeds an empty `prompt` is no prompt: the openai client must send one (vLLM's examples send "")
    given = [] if request.prompt_embeds is not None and not request.prompt else _prompt_list(request.prompt)
    count = len(given) + _count(request.prompt_embeds)
    models.limits.check_generation(count, request.num_sequences, request.stop)
    with models.admit(engine, count * request.num_sequences) as hold:
        prompts = await offload(embeds_prompts, engine, request) + await offload(_prompts, engine, given)
        params = [sampling_params(engine, request, prompt) for prompt in prompts]
        echo_texts = [_echo_text(engine.tokenizer, p) if request.echo else "" for p in prompts]
        call = _Call(request, echo_texts, model_name, engine.tokenizer, UsageReport.of(request, raw_request))
        if request.use_beam_search:
            searches = [beam_search_params(engine, request, p, sp.max_tokens) for p, sp in zip(prompts, params)]
            streams = [beam_search(engine, p, bp, f"{call.id}-{i}", lora)
                       for i, (p, bp) in enumerate(zip(prompts, searches, strict=True))]
        else:
            streams = [
                engine.generate(p.token_ids, sp, f"{call.id}-{i}", prompt=p.text, mm_items=p.mm_items,
                                lora_request=lora, cache_salt=request.cache_salt,
                                kv_transfer_params=request.kv_transfer_params)
                for i, (p, sp) in enumerate(zip(prompts, params, strict=True))
            ]
        if request.stream:
            return StreamingResponse(hold.over(_stream(call, streams)), media_type="text/event-stream")
        finished, outputs = await run_unless_disconnected(raw_request, collect_final(streams))
    if not finished:
        return Response(status_code=499)  # the client left; nobody reads this
    return await json_response(_full_response(call, outputs))


def _prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str] | list[list[int]]:
    """The request's prompts: one string, strings, one token-id list or token-id lists."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    if not prompt:
        raise APIError("`prompt` must not be empty", param="prompt")
    return prompt


def _count(prompt_embeds: str | list[str] | None) -> int:
    return 0 if prompt_embeds is None else 1 if isinstance(prompt_embeds, str) else len(prompt_embeds)


def _prompts(engine: AsyncLLM, given: list[str] | list[list[int]]) -> list[Prompt]:
    """Each prompt's token ids (text is tokenized once its length can fit the context), checked against the
    vocabulary; on the front end's pool."""
    prompts = [Prompt(encode_fitting(engine, p, "prompt"), p) if isinstance(p, str) else Prompt(p) for p in given]
    for p in prompts:
        check_token_ids(p.token_ids, engine.model_config.vocab_size, param="prompt")
    return prompts


def _echo_text(tokenizer: Any, prompt: Prompt) -> str:
    return prompt.text if prompt.text is not None else tokenizer.decode(prompt.token_ids)


def _full_response(call: _Call, outputs: list[RequestOutput]) -> CompletionResponse:
    choices = [
        _choice(call, call.choice_index(i, c.index), i, output, Delta.whole(c))
        for i, output in enumerate(outputs)
        for c in output.outputs
    ]
    return call.response(choices, usage=call.report.total(outputs), kv_transfer_params=outputs[0].kv_transfer_params)


async def _stream(call: _Call, streams: list[AsyncGenerator[RequestOutput, None]]) -> AsyncIterator[bytes | str]:
    envelope = ChunkEnvelope(call.id, "text_completion", call.created, call.model)
    tracker = DeltaTracker()
    latest: dict[int, RequestOutput] = {}
    try:
        async with aclosing(merge_async_iterators(*streams)) as merged:
            async for i, output in merged:
                latest[i] = output
                events = b"".join(_events(call, envelope, tracker, i, output))  # one write per engine output
                if events:
                    yield events
        if call.report.final_chunk:
            yield envelope.event([], usage=call.report.total(list(latest.values())))
    except Exception as exc:  # the status line is sent already: report the error in the stream
        logger.exception("completion stream %s failed", call.id)
        yield sse(error_body_for(exc))
    yield SSE_DONE


def _events(call: _Call, envelope: ChunkEnvelope, tracker: DeltaTracker, prompt_index: int,
            output: RequestOutput) -> Iterator[bytes]:
    """The chunks one engine output adds: one per choice with something new."""
    for c in output.outputs:
        index = call.choice_index(prompt_index, c.index)
        delta = tracker.delta(index, c)
        if delta is not None:
            choice = _choice_fields(call, index, prompt_index, output, delta)
            yield envelope.event([choice], usage=call.report.so_far(output, c))


def _choice(call: _Call, index: int, prompt_index: int, output: RequestOutput, delta: Delta) -> CompletionChoice:
    return CompletionChoice(**_choice_fields(call, index, prompt_index, output, delta))


def _choice_fields(call: _Call, index: int, prompt_index: int, output: RequestOutput, delta: Delta
                   ) -> dict[str, Any]:
    """A choice's chunk (or whole answer), the fields of a `CompletionChoice` in its order: an echoed prompt, its
    token ids and logprobs come with the first."""
    request = call.request
    echo = call.echo_texts[prompt_index]
    first = delta.first
    return {
        "index": index, "text": (echo if first else "") + delta.text, "logprobs": _logprobs(call, echo, output, delta),
        "finish_reason": delta.finish_reason, "stop_reason": delta.stop_reason,
        "prompt_logprobs": prompt_logprobs_json(output.prompt_logprobs) if first else None,
        "prompt_token_ids": output.prompt_token_ids if first and request.return_token_ids else None,
        "token_ids": delta.token_ids if request.return_token_ids else None,
    }


def _logprobs(call: _Call, echo: str, output: RequestOutput, delta: Delta) -> CompletionLogProbs | None:
    """The delta's token logprobs; with `echo`, the prompt's come first (its first token without one), and the
    offsets count the echoed text."""
    request = call.request
    if request.logprobs is None:
        return None
    as_ids = request.return_tokens_as_token_ids
    result = completion_logprobs(delta.token_ids, delta.logprobs, delta.offset + len(echo), call.decode, as_ids)
    if request.echo and delta.first:
        prompt = completion_logprobs(output.prompt_token_ids, output.prompt_logprobs, 0, call.decode, as_ids)
        result = joined_logprobs(prompt, result)
    return result

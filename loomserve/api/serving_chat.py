"""POST /v1/chat/completions: messages -> chat template -> one engine request -> an OpenAI chat completion."""

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
from loomserve.api.chat import TemplateInputs, chat_prompt
from loomserve.api.chat_parsing import ChatOutputParser, ChoiceStream
from loomserve.api.errors import error_body_for
from loomserve.api.logprobs import chat_logprobs, prompt_logprobs_json
from loomserve.api.offload import json_response
from loomserve.api.prompts import check_token_ids
from loomserve.api.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogProbs,
)
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
from loomserve.api.tool_parsers.choice import forced_params
from loomserve.api.usage_report import UsageReport
from loomserve.platform.async_llm import AsyncLLM
from loomserve.platform.request import RequestOutput

logger = logging.getLogger(__name__)


@dataclass
class _Call:
    """One /v1/chat/completions call and the fixed fields of every chunk."""

    request: ChatCompletionRequest
    model: str
    parser: ChatOutputParser
    report: UsageReport
    id: str = field(default_factory=lambda: random_id("chatcmpl"))
    created: int = field(default_factory=lambda: int(time.time()))

    def logprobs(self, delta: Delta) -> ChatLogProbs | None:
        if delta.logprobs is None:
            return None
        return chat_logprobs(delta.token_ids, delta.logprobs, self.request.top_logprobs or 0,
                             self.request.return_tokens_as_token_ids)

    def token_ids(self, token_ids: list[int]) -> list[int] | None:
        return token_ids if self.request.return_token_ids else None


async def create_chat_completion(
    models: ServedModels, engine: AsyncLLM, request: ChatCompletionRequest, raw_request: Request
) -> Response:
    lora, model_name = await lora_for(engine, request.model)
    models.limits.check_generation(1, request.num_sequences, request.stop)
    options = raw_request.app.state.chat_options
    parser = ChatOutputParser.for_request(request, options)
    inputs = TemplateInputs.of(request, options.content_format)
    with models.admit(engine, request.num_sequences) as hold:
        prompt = await chat_prompt(engine, request.messages, models.limits.media_budget, inputs)
        check_token_ids(prompt.token_ids, engine.model_config.vocab_size, param="messages")
        params = forced_params(sampling_params(engine, request, prompt), parser.tools)
        params = parser.constrain_after_reasoning(params, engine.tokenizer, prompt.token_ids)
        call = _Call(request, model_name, parser, UsageReport.of(request, raw_request))
        if request.use_beam_search:
            search = beam_search_params(engine, request, prompt, params.max_tokens)
            stream = beam_search(engine, prompt, search, call.id, lora)
        else:
            stream = engine.generate(prompt.token_ids, params, call.id, prompt=prompt.text, mm_items=prompt.mm_items,
                                     lora_request=lora, cache_salt=request.cache_salt,
                                     kv_transfer_params=request.kv_transfer_params)
        if request.stream:
            return StreamingResponse(hold.over(_stream(call, stream)), media_type="text/event-stream")
        finished, outputs = await run_unless_disconnected(raw_request, collect_final([stream]))
    if not finished:
        return Response(status_code=499)  # the client left; nobody reads this
    return await json_response(_full_response(call, outputs[0]))


def _full_response(call: _Call, output: RequestOutput) -> ChatCompletionResponse:
    choices = []
    for c in output.outputs:
        delta = Delta.whole(c)
        message = call.parser.message(c.text)
        choices.append(ChatChoice(
            index=c.index, message=message, logprobs=call.logprobs(delta),
            finish_reason=call.parser.finish_reason(c.finish_reason, bool(message.tool_calls)),
            stop_reason=c.stop_reason, token_ids=call.token_ids(c.token_ids),
        ))
    return ChatCompletionResponse(
        id=call.id, created=call.created, model=call.model, choices=choices, usage=call.report.total([output]),
        kv_transfer_params=output.kv_transfer_params, prompt_logprobs=prompt_logprobs_json(output.prompt_logprobs),
        prompt_token_ids=call.token_ids(output.prompt_token_ids),
    )


async def _stream(call: _Call, stream: AsyncGenerator[RequestOutput, None]) -> AsyncIterator[bytes | str]:
    envelope = ChunkEnvelope(call.id, "chat.completion.chunk", call.created, call.model)
    tracker = DeltaTracker()
    texts: dict[int, ChoiceStream] = {}
    latest: RequestOutput | None = None
    try:
        async with aclosing(merge_async_iterators(stream)) as merged:
            async for _, output in merged:
                latest = output
                events = b"".join(_events(call, envelope, tracker, texts, output))  # one write per engine output
                if events:
                    yield events
        if call.report.final_chunk and latest is not None:
            yield envelope.event([], usage=call.report.total([latest]))
    except Exception as exc:  # the status line is sent already: report the error in the stream
        logger.exception("chat stream %s failed", call.id)
        yield sse(error_body_for(exc))
    yield SSE_DONE


def _events(call: _Call, envelope: ChunkEnvelope, tracker: DeltaTracker, texts: dict[int, ChoiceStream],
            output: RequestOutput) -> Iterator[bytes]:
    """The chunks one engine output adds: a choice's first brings the role, then its parsed text as it comes
    (content, reasoning, tool calls)."""
    for c in output.outputs:
        delta = tracker.delta(c.index, c)
        if delta is None:
            continue
        text = texts.setdefault(c.index, ChoiceStream(call.parser))
        usage_so_far = call.report.so_far(output, c)
        if delta.first:
            role = _choice_json(c.index, {"role": "assistant", "content": ""}, None, None, None, None)
            yield envelope.event([role], usage=usage_so_far, prompt_token_ids=call.token_ids(output.prompt_token_ids))
        message = text.delta_fields(c.text, final=delta.finish_reason is not None)
        if message is not None or delta.finish_reason or delta.logprobs:
            yield envelope.event([_stream_choice(call, c.index, delta, message, text.called)], usage=usage_so_far)


def _stream_choice(call: _Call, index: int, delta: Delta, message: dict[str, Any] | None,
                   called: bool) -> dict[str, Any]:
    return _choice_json(index, message or {"content": ""}, call.logprobs(delta),
                        call.parser.finish_reason(delta.finish_reason, called), delta.stop_reason,
                        call.token_ids(delta.token_ids))


def _choice_json(index: int, message: dict[str, Any], logprobs: ChatLogProbs | None,
                 finish_reason: str | None, stop_reason: int | str | None, token_ids: list[int] | None
                 ) -> dict[str, Any]:
    """A `ChatStreamChoice` as it serializes (its None fields kept)."""
    return {"index": index, "delta": message, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": stop_reason, "token_ids": token_ids}

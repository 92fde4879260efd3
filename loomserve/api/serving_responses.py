"""POST /v1/responses: OpenAI's Responses API over the chat path, as vLLM serves it for text and images. The input
(a string, or messages of input_text / input_image parts) and `instructions` become chat messages; the answer is one
assistant message of output_text, whole or streamed as Responses events (response.created ... response.completed).
Nothing is stored: `previous_response_id` is refused and there is no GET of a past response."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from loomserve.api.chat import chat_prompt
from loomserve.api.errors import error_body_for
from loomserve.api.offload import json_response
from loomserve.api.prompts import check_token_ids
from loomserve.api.protocol import ChatCompletionRequest
from loomserve.api.protocol_responses import (
    IncompleteDetails,
    InputTokensDetails,
    OutputMessage,
    OutputText,
    ResponseEvent,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)
from loomserve.api.served_models import Models
from loomserve.api.serving import DeltaTracker, collect_final, lora_for, random_id, sampling_params
from loomserve.api.streaming import run_unless_disconnected, sse
from loomserve.platform.request import RequestOutput

logger = logging.getLogger(__name__)
router = APIRouter()


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, raw_request: Request, models: Models) -> Response:
    engine = models.for_route(body.model, "/v1/responses", ("generate",))
    await engine.check_health()
    lora, model_name = await lora_for(engine, body.model)
    chat = ChatCompletionRequest(model=body.model, messages=body.chat_messages(), max_tokens=body.max_output_tokens,
                                 temperature=body.temperature, top_p=body.top_p)
    with models.admit(engine, 1) as hold:
        prompt = await chat_prompt(engine, chat.messages, models.limits.media_budget)
        check_token_ids(prompt.token_ids, engine.model_config.vocab_size, param="input")
        call = _Call(body, model_name)
        stream = engine.generate(prompt.token_ids, sampling_params(engine, chat, prompt), call.id, prompt=prompt.text,
                                 mm_items=prompt.mm_items, lora_request=lora)
        if body.stream:
            return StreamingResponse(hold.over(_stream(call, stream)), media_type="text/event-stream")
        finished, outputs = await run_unless_disconnected(raw_request, collect_final([stream]))
    if not finished:
        return Response(status_code=499)  # the client left; nobody reads this
    return await json_response(call.response(outputs[0]))


@dataclass
class _Call:
    """One /v1/responses call: the ids and settings every event repeats."""

    request: ResponsesRequest
    model: str
    id: str = field(default_factory=lambda: random_id("resp"))
    message_id: str = field(default_factory=lambda: random_id("msg"))
    sequence: int = 0

    def response(self, output: RequestOutput | None) -> ResponseObject:
        """The response object: in progress (no output yet), or done with the output's message and usage."""
        r = self.request
        fields = dict(id=self.id, model=self.model, instructions=r.instructions, max_output_tokens=r.max_output_tokens,
                      temperature=r.temperature, top_p=r.top_p, metadata=r.metadata)
        if output is None:
            return ResponseObject(status="in_progress", **fields)
        [choice] = output.outputs
        incomplete = choice.finish_reason == "length"
        prompt_tokens = len(output.prompt_token_ids)
        usage = ResponseUsage(input_tokens=prompt_tokens, output_tokens=len(choice.token_ids),
                              total_tokens=prompt_tokens + len(choice.token_ids),
                              input_tokens_details=InputTokensDetails(cached_tokens=output.num_cached_tokens))
        return ResponseObject(
            status="incomplete" if incomplete else "completed",
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if incomplete else None,
            output=[self.message(choice.text, "incomplete" if incomplete else "completed")], usage=usage, **fields)

    def message(self, text: str | None, status: str) -> OutputMessage:
        """The output message; `text` None: one still in progress, with no content part yet."""
        content = [OutputText(text=text)] if text is not None else []
        return OutputMessage(id=self.message_id, status=status, content=content)

    def event(self, kind: str, **fields: object) -> str:
        """One SSE event, numbered in stream order."""
        event = ResponseEvent(type=kind, sequence_number=self.sequence, **fields)
        self.sequence += 1
        return f"event: {kind}\n{sse(event)}"


async def _stream(call: _Call, stream: AsyncGenerator[RequestOutput, None]) -> AsyncIterator[str]:
    """Responses' event sequence for one output message of one output_text part."""
    where = {"item_id": call.message_id, "output_index": 0, "content_index": 0}
    yield call.event("response.created", response=call.response(None))
    yield call.event("response.in_progress", response=call.response(None))
    yield call.event("response.output_item.added", output_index=0, item=call.message(None, "in_progress"))
    yield call.event("response.content_part.added", part=OutputText(text=""), **where)
    tracker, latest = DeltaTracker(), None
    try:
        async with aclosing(stream):  # leaving early (the client left) aborts the request
            async for latest in stream:
                delta = tracker.delta(0, latest.outputs[0])
                if delta is not None and delta.text:
                    yield call.event("response.output_text.delta", delta=delta.text, logprobs=[], **where)
    except Exception as exc:  # the status line is sent already: report the error in the stream
        logger.exception("responses stream %s failed", call.id)
        yield sse(error_body_for(exc))
        return
    done = call.response(latest)
    text = done.output[0].content[0].text
    yield call.event("response.output_text.done", text=text, logprobs=[], **where)
    yield call.event("response.content_part.done", part=OutputText(text=text), **where)
    yield call.event("response.output_item.done", output_index=0, item=done.output[0])
    yield call.event("response.completed" if done.status == "completed" else "response.incomplete", response=done)

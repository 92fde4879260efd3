"""/v1/responses: OpenAI's Responses API over the chat path, as vLLM serves it. The input (a string, or items:
messages of input_text / input_image parts, earlier function calls and their outputs), `instructions` and, with
`previous_response_id`, the stored conversation it continues become chat messages; `tools` are chat's function
tools, parsed by the server's tool-call parser. The answer is an assistant message of output_text (with logprobs
when `include` asks) and the function calls, whole or streamed as Responses events (response.created ...
response.completed). With `--enable-responses-store` responses are kept (`response_store.py`): GET reads one,
`background` answers at once and runs on, and cancel stops a background one."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from loomserve.api.chat import TemplateInputs, chat_prompt
from loomserve.api.chat_parsing import ChatOutputParser, ChoiceStream
from loomserve.api.errors import APIError, error_body_for
from loomserve.api.logprobs import chat_logprobs
from loomserve.api.offload import json_response
from loomserve.api.prompts import check_token_ids
from loomserve.api.protocol import ChatLogProbsContent
from loomserve.api.protocol_responses import (
    FunctionCallItem,
    IncompleteDetails,
    InputTokensDetails,
    OutputMessage,
    OutputText,
    ResponseEvent,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)
from loomserve.api.response_store import DISABLED, ResponseStore
from loomserve.api.served_models import Models
from loomserve.api.serving import DeltaTracker, collect_final, lora_for, random_id, sampling_params
from loomserve.api.streaming import run_unless_disconnected, sse
from loomserve.api.tool_parsers.choice import forced_params
from loomserve.platform.request import CompletionOutput, RequestOutput

logger = logging.getLogger(__name__)
router = APIRouter()


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, raw_request: Request, models: Models) -> Response:
    engine = await models.for_generation(body.model, "/v1/responses")
    await engine.check_health()
    store = _store_for(raw_request, body)
    lora, model_name = await lora_for(engine, body.model)
    turns = [*(store.history(body.previous_response_id) if body.previous_response_id else []), *body.input_turns()]
    chat = body.chat_request(body.chat_messages(turns))
    options = raw_request.app.state.chat_options
    parser = ChatOutputParser.for_request(chat, options)
    with models.admit(engine, 1) as hold:
        prompt = await chat_prompt(engine, chat.messages, models.limits.media_budget,
                                   TemplateInputs.of(chat, options.content_format))
        check_token_ids(prompt.token_ids, engine.model_config.vocab_size, param="input")
        params = forced_params(sampling_params(engine, chat, prompt), parser.tools)
        call = _Call(body, model_name, parser, keep=store is not None)
        stream = engine.generate(prompt.token_ids, params, call.id, prompt=prompt.text, mm_items=prompt.mm_items,
                                 lora_request=lora)
        on_done = (lambda response: store.put(response, turns)) if store is not None else (lambda _: None)
        if body.background:
            task = asyncio.create_task(_run_in_background(call, stream, hold.over(stream), store))
            store.put(call.response(None, "queued"), turns, task)
            return await json_response(call.response(None, "queued"))
        if body.stream:
            return StreamingResponse(hold.over(_stream(call, stream, on_done)), media_type="text/event-stream")
        finished, outputs = await run_unless_disconnected(raw_request, collect_final([stream]))
    if not finished:
        return Response(status_code=499)  # the client left; nobody reads this
    response = call.response(outputs[0])
    on_done(response)
    return await json_response(response)


@router.get("/v1/responses/{response_id}")
async def retrieve_response(response_id: str, raw_request: Request) -> Response:
    return await json_response(_store_of(raw_request).get(response_id).response)


@router.post("/v1/responses/{response_id}/cancel")
async def cancel_response(response_id: str, raw_request: Request) -> Response:
    return await json_response(_store_of(raw_request).cancel(response_id))


def _store_of(raw_request: Request) -> ResponseStore:
    """The server's store; 400 when it keeps none."""
    store = getattr(raw_request.app.state, "response_store", None)
    if store is None:
        raise APIError(DISABLED, param="response_id")
    return store


def _store_for(raw_request: Request, body: ResponsesRequest) -> ResponseStore | None:
    """Where this response is kept (None: nowhere). As in vLLM, `store` (true by default) is dropped quietly when the
    server keeps none, while what needs a stored response is refused."""
    store = getattr(raw_request.app.state, "response_store", None)
    for wanted, name in ((body.previous_response_id is not None, "previous_response_id"),
                         (body.background, "background")):
        if wanted and store is None:
            raise APIError(DISABLED, param=name)
    if body.background and not body.store:
        raise APIError("`background` needs `store` set to true", param="background")
    if body.background and body.stream:
        raise APIError("`background` together with `stream` is not supported", param="stream")
    return store if body.store else None


@dataclass
class _Call:
    """One /v1/responses call: the ids and settings every event repeats, and how its output is read."""

    request: ResponsesRequest
    model: str
    parser: ChatOutputParser
    keep: bool = False  # the response is stored
    id: str = field(default_factory=lambda: random_id("resp"))
    message_id: str = field(default_factory=lambda: random_id("msg"))
    sequence: int = 0

    def response(self, output: RequestOutput | None, status: str = "in_progress") -> ResponseObject:
        """The response object: `status` with no output yet, or done with the output's items and usage."""
        r = self.request
        fields: dict[str, Any] = dict(
            id=self.id, model=self.model, instructions=r.instructions, max_output_tokens=r.max_output_tokens,
            temperature=r.temperature, top_p=r.top_p, metadata=r.metadata, tools=r.tools or [],
            tool_choice=r.tool_choice or "auto", parallel_tool_calls=r.parallel_tool_calls, top_logprobs=r.top_logprobs,
            store=self.keep, background=r.background, previous_response_id=r.previous_response_id)
        if output is None:
            return ResponseObject(status=status, **fields)
        [choice] = output.outputs
        incomplete = choice.finish_reason == "length"
        prompt_tokens = len(output.prompt_token_ids)
        usage = ResponseUsage(input_tokens=prompt_tokens, output_tokens=len(choice.token_ids),
                              total_tokens=prompt_tokens + len(choice.token_ids),
                              input_tokens_details=InputTokensDetails(cached_tokens=output.num_cached_tokens))
        return ResponseObject(
            status="incomplete" if incomplete else "completed",
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if incomplete else None,
            output=self.items(choice, "incomplete" if incomplete else "completed"), usage=usage, **fields)

    def items(self, choice: CompletionOutput, status: str) -> list[OutputMessage | FunctionCallItem]:
        """The output items: the message (when it says something or calls nothing), then each function call."""
        message = self.parser.message(choice.text)
        calls = [FunctionCallItem(id=random_id("fc"), call_id=c.id, name=c.function.name,
                                  arguments=c.function.arguments) for c in message.tool_calls]
        if calls and not message.content:
            return calls
        logprobs = self.logprobs(choice.token_ids, choice.logprobs)
        return [self.message(message.content or "", status, logprobs), *calls]

    def logprobs(self, token_ids: list[int], steps: list | None) -> list[ChatLogProbsContent]:
        if steps is None or self.request.output_logprobs is None:
            return []
        return chat_logprobs(token_ids, steps, self.request.output_logprobs).content

    def message(self, text: str | None, status: str, logprobs: list[ChatLogProbsContent] = ()) -> OutputMessage:
        """The output message; `text` None: one still in progress, with no content part yet."""
        content = [OutputText(text=text, logprobs=list(logprobs))] if text is not None else []
        return OutputMessage(id=self.message_id, status=status, content=content)

    def event(self, kind: str, **fields: object) -> str:
        """One SSE event, numbered in stream order."""
        event = ResponseEvent(type=kind, sequence_number=self.sequence, **fields)
        self.sequence += 1
        return f"event: {kind}\n{sse(event)}"


async def _run_in_background(call: _Call, stream: AsyncGenerator[RequestOutput, None],
                             held: AsyncIterator[RequestOutput], store: ResponseStore) -> None:
    """Run a background response to its end and store it; a cancel closes the engine stream (aborting it)."""
    latest = None
    store.update(call.response(None, "in_progress"))
    try:
        async with aclosing(stream), aclosing(held):
            async for output in held:
                latest = output
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception("background response %s failed", call.id)
        store.update(call.response(None, "failed"))
        return
    store.update(call.response(latest))


async def _stream(call: _Call, stream: AsyncGenerator[RequestOutput, None],
                  on_done: Callable[[ResponseObject], None]) -> AsyncIterator[str]:
    """Responses' event sequence: one output message of one output_text part, then any function calls."""
    where = {"item_id": call.message_id, "output_index": 0, "content_index": 0}
    yield call.event("response.created", response=call.response(None))
    yield call.event("response.in_progress", response=call.response(None))
    yield call.event("response.output_item.added", output_index=0, item=call.message(None, "in_progress"))
    yield call.event("response.content_part.added", part=OutputText(text=""), **where)
    tracker, text, latest = DeltaTracker(), ChoiceStream(call.parser), None
    pending: list[ChatLogProbsContent] = []  # logprobs of tokens whose text is not sent yet
    try:
        async with aclosing(stream):  # leaving early (the client left) aborts the request
            async for latest in stream:
                delta = tracker.delta(0, latest.outputs[0])
                if delta is None:
                    continue
                pending += call.logprobs(delta.token_ids, delta.logprobs)
                said = text.delta(latest.outputs[0].text, final=False)
                if said is not None and said.content:
                    yield call.event("response.output_text.delta", delta=said.content, logprobs=pending, **where)
                    pending = []
    except Exception as exc:  # the status line is sent already: report the error in the stream
        logger.exception("responses stream %s failed", call.id)
        yield sse(error_body_for(exc))
        return
    said = text.delta(latest.outputs[0].text, final=True)  # what a parser held back until the end
    if said is not None and said.content:
        yield call.event("response.output_text.delta", delta=said.content, logprobs=pending, **where)
    done = call.response(latest)
    if done.output[0].type != "message":  # the stream opened the message before it knew: keep it, empty
        done.output.insert(0, call.message("", done.status))
    message = done.output[0]
    part = message.content[0]
    yield call.event("response.output_text.done", text=part.text, logprobs=part.logprobs, **where)
    yield call.event("response.content_part.done", part=part, **where)
    yield call.event("response.output_item.done", output_index=0, item=message)
    for index, item in enumerate(done.output[1:], start=1):
        yield call.event("response.output_item.added", output_index=index, item=item.model_copy(
            update={"arguments": "", "status": "in_progress"}))
        yield call.event("response.function_call_arguments.delta", item_id=item.id, output_index=index,
                         delta=item.arguments)
        yield call.event("response.function_call_arguments.done", item_id=item.id, output_index=index,
                         arguments=item.arguments)
        yield call.event("response.output_item.done", output_index=index, item=item)
    on_done(done)
    yield call.event("response.completed" if done.status == "completed" else "response.incomplete", response=done)

"""POST /v1/chat/completions/batch (vLLM's): many conversations in one request, one engine request each, answered
together as one chat completion whose choice i answers conversation i. Not streamed; one choice per
conversation."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import model_validator

from loomserve.api.chat import TemplateInputs, chat_prompt
from loomserve.api.chat_parsing import ChatOutputParser
from loomserve.api.offload import json_response
from loomserve.api.prompts import check_token_ids
from loomserve.api.protocol import ChatCompletionRequest, ChatCompletionResponse, ChatMessage
from loomserve.api.served_models import Models
from loomserve.api.serving import collect_final, lora_for, sampling_params
from loomserve.api.serving_chat import _Call, _full_response
from loomserve.api.streaming import run_unless_disconnected
from loomserve.api.tool_parsers.choice import forced_params
from loomserve.api.usage_report import UsageReport

router = APIRouter()


class BatchChatCompletionRequest(ChatCompletionRequest):
    messages: list[list[ChatMessage]]  # type: ignore[assignment]  # one conversation per item

    @model_validator(mode="after")
    def _one_answer_per_conversation(self) -> BatchChatCompletionRequest:
        if not self.messages:
            raise ValueError("`messages` must hold at least one conversation")
        if self.stream:
            raise ValueError("Streaming is not supported for batch chat completions")
        if self.n != 1:
            raise ValueError("`n` must be 1 for batch chat completions: choice i answers conversation i")
        return self


@router.post("/v1/chat/completions/batch")
async def batch_chat_completions(body: BatchChatCompletionRequest, raw_request: Request, models: Models) -> Response:
    engine = await models.for_generation(body.model, "/v1/chat/completions/batch")
    await engine.check_health()
    lora, model_name = await lora_for(engine, body.model)
    models.limits.check_generation(len(body.messages), 1, body.stop)
    options = raw_request.app.state.chat_options
    parser = ChatOutputParser.for_request(body, options)
    inputs = TemplateInputs.of(body, options.content_format)
    call = _Call(body, model_name, parser, UsageReport.of(body, raw_request))
    with models.admit(engine, len(body.messages)):
        streams = []
        for i, messages in enumerate(body.messages):
            prompt = await chat_prompt(engine, messages, models.limits.media_budget, inputs)
            check_token_ids(prompt.token_ids, engine.model_config.vocab_size, param="messages")
            params = forced_params(sampling_params(engine, body, prompt), parser.tools)
            streams.append(engine.generate(
                prompt.token_ids, params, f"{call.id}_{i}", prompt=prompt.text,
                mm_items=prompt.mm_items, lora_request=lora, cache_salt=body.cache_salt,
            ))
        finished, outputs = await run_unless_disconnected(raw_request, collect_final(streams))
    if not finished:
        return Response(status_code=499)  # the client left; nobody reads this
    answers = [_full_response(call, output) for output in outputs]
    choices = [answer.choices[0].model_copy(update={"index": i}) for i, answer in enumerate(answers)]
    return await json_response(ChatCompletionResponse(
        id=call.id, created=call.created, model=model_name, choices=choices, usage=call.report.total(outputs),
    ))

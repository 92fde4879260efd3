"""Bodies of /v1/responses (OpenAI's Responses API, the part vLLM serves for text, images and function tools): the
request and its input items, the response object and its output items (messages, function calls), and the streamed
events."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from loomserve.api.protocol import (
    ChatCompletionRequest,
    ChatCompletionTool,
    ChatLogProbsContent,
    ChatMessage,
    FunctionDefinition,
    LogprobCount,
    NamedFunction,
    NamedToolChoice,
    OpenAIBaseModel,
    _DropsNone,
)


def _typed_item(value: Any) -> Any:
    """An input item without `type` is a message (OpenAI's EasyInputMessage)."""
    return {**value, "type": "message"} if isinstance(value, dict) and "type" not in value else value


class InputContent(OpenAIBaseModel):
    """`input_text` (text) or `input_image` (image_url: a URL or data: URL); `output_text` in earlier assistant
    turns."""

    type: Literal["input_text", "input_image", "output_text"]
    text: str | None = None
    image_url: str | None = None


class InputMessage(OpenAIBaseModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputContent]


class FunctionCallInput(OpenAIBaseModel):
    """A function call of an earlier turn, as the model made it (an output item sent back)."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputInput(OpenAIBaseModel):
    """The client's result of a function call."""

    type: Literal["function_call_output"]
    call_id: str
    output: str
    id: str | None = None
    status: str | None = None


InputItem = Annotated[InputMessage | FunctionCallInput | FunctionCallOutputInput, Field(discriminator="type")]


class FunctionTool(OpenAIBaseModel):
    """Responses' function tool: chat's function definition, flat."""

    type: Literal["function"] = "function"
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def chat_tool(self) -> ChatCompletionTool:
        return ChatCompletionTool(function=FunctionDefinition(name=self.name, description=self.description,
                                                              parameters=self.parameters, strict=self.strict))


class FunctionToolChoice(OpenAIBaseModel):
    type: Literal["function"] = "function"
    name: str


OUTPUT_LOGPROBS = "message.output_text.logprobs"  # the `include` value that asks for the output's logprobs


class ResponsesRequest(OpenAIBaseModel):
    model: str | None = None
    input: str | list[Annotated[InputItem, BeforeValidator(_typed_item)]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    store: bool = True  # OpenAI's default; kept only when the server stores responses (--enable-responses-store)
    background: bool = False  # answer at once; the response is read later with GET (needs store)
    previous_response_id: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = None
    parallel_tool_calls: bool = True
    include: list[Literal["message.output_text.logprobs"]] | None = None
    top_logprobs: LogprobCount | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None

    @property
    def output_logprobs(self) -> int | None:
        """Logprobs per output token (the `top_logprobs` alternatives) when `include` asks for them."""
        return (self.top_logprobs or 0) if OUTPUT_LOGPROBS in (self.include or []) else None

    def chat_request(self, messages: list[ChatMessage]) -> ChatCompletionRequest:
        """The chat completion this response is: the conversation, sampling, tools and logprobs."""
        choice = self.tool_choice
        if isinstance(choice, FunctionToolChoice):
            choice = NamedToolChoice(function=NamedFunction(name=choice.name))
        return ChatCompletionRequest(
            model=self.model, messages=messages, max_tokens=self.max_output_tokens, temperature=self.temperature,
            top_p=self.top_p, tools=[t.chat_tool() for t in self.tools] if self.tools else None, tool_choice=choice,
            parallel_tool_calls=self.parallel_tool_calls, logprobs=self.output_logprobs is not None,
            top_logprobs=self.output_logprobs or None)

    def input_turns(self) -> list[dict[str, Any]]:
        """The input as chat turns (function calls as the assistant's tool calls, their outputs as tool turns)."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        return [_chat_turn(item) for item in self.input]

    def chat_messages(self, turns: list[dict[str, Any]]) -> list[ChatMessage]:
        """The chat conversation: `instructions` first as the system message, then `turns`."""
        system = [{"role": "system", "content": self.instructions}] if self.instructions else []
        return [ChatMessage.model_validate(turn) for turn in [*system, *turns]]


def _chat_turn(item: InputMessage | FunctionCallInput | FunctionCallOutputInput) -> dict[str, Any]:
    if isinstance(item, FunctionCallInput):
        call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
        return {"role": "assistant", "content": None, "tool_calls": [call]}
    if isinstance(item, FunctionCallOutputInput):
        return {"role": "tool", "tool_call_id": item.call_id, "content": item.output}
    return {"role": "system" if item.role == "developer" else item.role, "content": _chat_content(item.content)}


def _chat_content(content: str | list[InputContent]) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    return [{"type": "image_url", "image_url": {"url": part.image_url}} if part.type == "input_image"
            else {"type": "text", "text": part.text or ""} for part in content]


class OutputText(OpenAIBaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[ChatLogProbsContent] = Field(default_factory=list)  # token, logprob, bytes, top_logprobs


class OutputMessage(OpenAIBaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class FunctionCallItem(OpenAIBaseModel):
    """A function call the model made: the client runs it and sends back a function_call_output."""

    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


OutputItem = Annotated[OutputMessage | FunctionCallItem, Field(discriminator="type")]


class InputTokensDetails(OpenAIBaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(OpenAIBaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(OpenAIBaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(OpenAIBaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseObject(OpenAIBaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    model: str
    status: Literal["queued", "in_progress", "completed", "incomplete", "cancelled", "failed"]
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    metadata: dict[str, str] | None = None
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice = "auto"
    tools: list[FunctionTool] = Field(default_factory=list)
    top_logprobs: int | None = None
    store: bool = False
    background: bool = False
    previous_response_id: str | None = None
    usage: ResponseUsage | None = None
    error: Any = None


class ResponseEvent(_DropsNone):
    """One streamed event: its `type`, its place in the stream and the fields of that type (no others)."""

    type: str
    sequence_number: int
    response: ResponseObject | None = None
    output_index: int | None = None
    item_id: str | None = None
    content_index: int | None = None
    item: OutputItem | None = None
    arguments: str | None = None
    part: OutputText | None = None
    delta: str | None = None
    text: str | None = None
    logprobs: list[ChatLogProbsContent] | None = None

"""Bodies of POST /v1/responses (OpenAI's Responses API, the part vLLM serves for text and images): the request,
the response object and its output message, and the streamed events."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import Field, field_validator

from loomserve.api.protocol import ChatMessage, OpenAIBaseModel, _DropsNone


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


class ResponsesRequest(OpenAIBaseModel):
    model: str | None = None
    input: str | list[InputMessage]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    store: bool = False  # accepted; nothing is stored here, so `previous_response_id` is refused
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None

    @field_validator("previous_response_id")
    @classmethod
    def _no_stored_responses(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError("this server stores no responses: send the whole conversation in `input`")
        return value

    def chat_messages(self) -> list[ChatMessage]:
        """The conversation as chat messages: `instructions` first as the system message."""
        turns = [{"role": "user", "content": self.input}] if isinstance(self.input, str) else [
            {"role": "system" if m.role == "developer" else m.role, "content": _chat_content(m.content)}
            for m in self.input
        ]
        if self.instructions:
            turns.insert(0, {"role": "system", "content": self.instructions})
        return [ChatMessage.model_validate(turn) for turn in turns]


def _chat_content(content: str | list[InputContent]) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    return [{"type": "image_url", "image_url": {"url": part.image_url}} if part.type == "input_image"
            else {"type": "text", "text": part.text or ""} for part in content]


class OutputText(OpenAIBaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(OpenAIBaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


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
    status: Literal["in_progress", "completed", "incomplete"]
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    metadata: dict[str, str] | None = None
    output: list[OutputMessage] = Field(default_factory=list)
    parallel_tool_calls: bool = False
    tool_choice: Literal["none", "auto"] = "none"
    tools: list[Any] = Field(default_factory=list)
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
    item: OutputMessage | None = None
    part: OutputText | None = None
    delta: str | None = None
    text: str | None = None
    logprobs: list[Any] | None = None

"""Bodies of /v1/audio/transcriptions and /v1/audio/translations (multipart form fields) and their answers, shaped
as OpenAI's and vLLM's: `json` {text, usage}, `verbose_json` with segments, and `transcription.chunk` stream events.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import Field

from loomserve.api.protocol import OpenAIBaseModel

ResponseFormat = Literal["json", "text", "verbose_json", "srt", "vtt"]


class TranscriptionRequest(OpenAIBaseModel):
    """The form's fields besides `file` (`timestamp_granularities[]` arrives as a list)."""

    model: str | None = None
    language: str | None = None  # ISO 639-1; absent: English, as vLLM assumes
    prompt: str = ""
    response_format: ResponseFormat = "json"
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    timestamp_granularities: list[Literal["segment", "word"]] = Field(default_factory=lambda: ["segment"])
    stream: bool = False
    stream_include_usage: bool = False
    seed: int | None = None
    # vLLM's sampling fields beside OpenAI's
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_completion_tokens: int | None = Field(None, ge=1)


class TranscriptionUsage(OpenAIBaseModel):
    type: Literal["duration"] = "duration"
    seconds: int


class TranscriptionResponse(OpenAIBaseModel):
    text: str
    usage: TranscriptionUsage | None = None


class TranscriptionSegment(OpenAIBaseModel):
    id: int
    seek: int  # where the segment's 30 s window starts, in feature frames (10 ms)
    start: float  # seconds from the start of the whole audio
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0


class TranscriptionResponseVerbose(OpenAIBaseModel):
    task: Literal["transcribe", "translate"]
    language: str
    duration: float
    text: str
    segments: list[TranscriptionSegment]


class DeltaMessage(OpenAIBaseModel):
    content: str


class TranscriptionStreamChoice(OpenAIBaseModel):
    delta: DeltaMessage
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class StreamUsage(OpenAIBaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TranscriptionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["transcription.chunk", "translation.chunk"] = "transcription.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[TranscriptionStreamChoice]
    usage: StreamUsage | None = None


def _form_schema() -> dict[str, Any]:
    """The multipart form as OpenAPI states it: the fields above plus the audio file."""
    schema = TranscriptionRequest.model_json_schema()
    schema["properties"] = {"file": {"type": "string", "format": "binary"}, **schema["properties"]}
    schema["required"] = ["file"]
    return schema


# The routes read their form themselves (python-multipart is optional), so their schema is stated here.
TRANSCRIPTION_OPENAPI: dict[str, Any] = {
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _form_schema()}}},
    "responses": {"400": {"description": "Not audio, an unknown language or model, a bad field (the message says)",
                          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}},
}

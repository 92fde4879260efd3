"""POST /v1/audio/transcriptions and /v1/audio/translations: an uploaded audio file -> Whisper's text, whole or
streamed, as vLLM serves them.

The audio is decoded (soundfile, or PyAV for other containers such as m4a), resampled to 16 kHz and cut at quiet
points into clips of at most 30 s (`modalities/audio_split.py`); every clip becomes one engine request with vLLM's
decoder prompt
`[<|startofprev|> prompt] <|startoftranscript|><|lang|><|transcribe|or|translate|><|notimestamps|>`, and all clips
run at once. Their texts join in order; `verbose_json`, `srt` and `vtt` give each clip as a segment at its true
offset in the whole audio. A stream sends each clip's text as it grows, clip after clip, as `transcription.chunk`
events, each clip's last one with its finish reason.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError

from loomserve.api.errors import APIError, error_body_for
from loomserve.api.offload import json_response, offload
from loomserve.api.protocol_transcription import (
    DeltaMessage,
    StreamUsage,
    TranscriptionRequest,
    TranscriptionResponse,
    TranscriptionResponseVerbose,
    TranscriptionSegment,
    TranscriptionStreamChoice,
    TranscriptionStreamResponse,
    TranscriptionUsage,
)
from loomserve.api.served_models import ServedModels
from loomserve.api.serving import DeltaTracker, collect_final, random_id
from loomserve.api.streaming import SSE_DONE, merge_async_iterators, run_unless_disconnected, sse
from loomserve.api.subtitles import to_srt, to_vtt
from loomserve.modalities.audio import resample
from loomserve.modalities.audio_container import decode_any_audio
from loomserve.modalities.audio_split import AudioClip, split_audio
from loomserve.modalities.budget import MediaSpend
from loomserve.modalities.inputs import MultiModalItem
from loomserve.modalities.media import MediaError
from loomserve.platform.async_llm import AsyncLLM
from loomserve.platform.input_processor import ENCODER_DECODER_INPUT
from loomserve.platform.request import RequestOutput, SamplingParams

logger = logging.getLogger(__name__)

RATE = 16000  # Whisper's sampling rate
HOP = 160  # samples per feature frame: a segment's `seek` counts these
TASKS = {"/v1/audio/transcriptions": "transcribe", "/v1/audio/translations": "translate"}


@dataclass
class _Call:
    """One transcription or translation: its request, its clips and the fixed fields of every answer."""

    request: TranscriptionRequest
    task: str
    language: str
    model: str
    clips: list[AudioClip]
    id: str = field(default_factory=lambda: random_id("trsc"))

    @property
    def duration(self) -> float:
        return sum(len(c.samples) for c in self.clips) / RATE


async def create_transcription(models: ServedModels, raw_request: Request) -> Response:
    route = raw_request.url.path
    upload, request = await _read_form(raw_request)
    engine = models.for_route(request.model, route, ("generate",))
    name = engine.model_config.served_model_name
    if not engine.input_processor.encoder_decoder:
        raise APIError(f"The model `{name}` does not support {route}: it is not a speech-to-text (Whisper) model",
                       param="model")
    if "word" in request.timestamp_granularities:
        raise APIError("word timestamps are not supported; use timestamp_granularities[]=segment",
                       param="timestamp_granularities")
    await engine.check_health()
    language, task = request.language or "en", TASKS[route]
    prompt = await offload(decoder_prompt, engine.tokenizer, language, task, request.prompt)
    max_len = engine.model_config.max_model_len
    if len(prompt) >= max_len:
        raise APIError(f"the prompt and Whisper's task tokens take {len(prompt)} of the model's {max_len} decoder "
                       "positions, which leaves none for the text", param="prompt")
    spend = MediaSpend(models.limits.media_budget)
    call = _Call(request, task, language, name, await offload(_load_clips, await upload.read(), spend))
    inputs = await offload(_clip_inputs, engine, prompt, call.clips)
    params = _sampling_params(request, max_len - len(prompt))
    with models.admit(engine, len(call.clips)) as hold:
        streams = [engine.generate(prompt, params, f"{call.id}-{i}", mm_items=items)
                   for i, items in enumerate(inputs)]
        if request.stream:
            return StreamingResponse(hold.over(_stream(call, streams)), media_type="text/event-stream")
        finished, outputs = await run_unless_disconnected(raw_request, collect_final(streams))
    if not finished:
        return Response(status_code=499)  # the client left; nobody reads this
    return await _answer(call, outputs)


def refuse_speech_to_text(engine: AsyncLLM, route: str) -> None:
    """400 at a text route for a Whisper model, whose every prompt needs its audio."""
    if engine.input_processor.encoder_decoder:
        raise APIError(f"The model `{engine.model_config.served_model_name}` does not support {route}: "
                       f"{ENCODER_DECODER_INPUT}", param="model")


async def _read_form(raw_request: Request) -> tuple[Any, TranscriptionRequest]:
    """The uploaded file and the other fields, validated; 400 for a missing file or a bad field."""
    try:
        form = await raw_request.form()
    except AssertionError:  # starlette's way of saying python-multipart is not installed
        raise APIError("this server cannot read multipart forms: install python-multipart", status=500) from None
    except Exception as exc:
        raise APIError(f"cannot read the multipart form: {exc}") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise APIError("`file` (the audio to transcribe) is required as a multipart file field", param="file")
    fields: dict[str, Any] = {k: v for k, v in form.items() if isinstance(v, str) and k != "timestamp_granularities[]"}
    granularities = form.getlist("timestamp_granularities[]") or form.getlist("timestamp_granularities")
    if granularities:
        fields["timestamp_granularities"] = granularities
    try:
        return upload, TranscriptionRequest.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise APIError(f"{where}: {first['msg']}", param=str(first["loc"][0]) if first["loc"] else None) from None


def _load_clips(data: bytes, spend: MediaSpend) -> list[AudioClip]:
    """Decoded, 16 kHz mono, cut at quiet points into clips of at most 30 s; 400 for what is not audio or is over
    the request's media limits (--max-audio-seconds-per-request, --max-media-bytes-per-request)."""
    try:
        spend.charge("bytes", len(data))
        samples, rate = decode_any_audio(data, spend)
    except MediaError as exc:
        raise APIError(str(exc), param="file") from None
    return split_audio(resample(samples, rate, RATE), RATE)


def decoder_prompt(tokenizer: Any, language: str, task: str, prompt: str) -> list[int]:
    """vLLM's Whisper decoder prompt; 400 for a language the checkpoint's tokenizer has no token for."""
    lang = f"<|{language}|>"
    if tokenizer.convert_tokens_to_ids(lang) in (None, tokenizer.unk_token_id) or lang not in tokenizer.get_vocab():
        raise APIError(f"unsupported language {language!r}: this model has no {lang} token", param="language")
    previous = tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
    head = [tokenizer.convert_tokens_to_ids("<|startofprev|>"), *previous] if previous else []
    return head + tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", lang, f"<|{task}|>", "<|notimestamps|>"])


def _sampling_params(request: TranscriptionRequest, room: int) -> SamplingParams:
    """Each clip's sampling; `room`: the decoder positions the prompt leaves. 400 for values out of range."""
    try:
        return SamplingParams(
            temperature=request.temperature, top_p=request.top_p, top_k=request.top_k, min_p=request.min_p,
            seed=request.seed, frequency_penalty=request.frequency_penalty, presence_penalty=request.presence_penalty,
            repetition_penalty=request.repetition_penalty, max_tokens=min(request.max_completion_tokens or room, room),
            logprobs=0 if request.response_format == "verbose_json" else None)  # a segment's avg_logprob
    except ValueError as exc:
        raise APIError(str(exc)) from None


def _clip_inputs(engine: AsyncLLM, prompt: list[int], clips: list[AudioClip]) -> list[list[MultiModalItem]]:
    """Each clip's encoder input, made by the model's processor."""
    try:
        return [engine.input_processor.mm.apply(prompt, {"audio": (c.samples, RATE)})[1] for c in clips]
    except MediaError as exc:
        raise APIError(str(exc), param="file") from None


def _segments(call: _Call, outputs: list[RequestOutput]) -> list[TranscriptionSegment]:
    segments = []
    for i, (clip, output) in enumerate(zip(call.clips, outputs, strict=True)):
        c = output.outputs[0]
        avg = c.cumulative_logprob / len(c.token_ids) if c.cumulative_logprob is not None and c.token_ids else 0.0
        segments.append(TranscriptionSegment(
            id=i, seek=clip.offset // HOP, start=clip.offset / RATE, end=(clip.offset + len(clip.samples)) / RATE,
            text=c.text, tokens=c.token_ids, temperature=call.request.temperature, avg_logprob=avg))
    return segments


async def _answer(call: _Call, outputs: list[RequestOutput]) -> Response:
    text = "".join(out.outputs[0].text for out in outputs)
    fmt = call.request.response_format
    if fmt == "text":
        return PlainTextResponse(text)
    if fmt in ("srt", "vtt"):
        segments = _segments(call, outputs)
        return PlainTextResponse(to_srt(segments) if fmt == "srt" else to_vtt(segments))
    if fmt == "verbose_json":
        return await json_response(TranscriptionResponseVerbose(
            task=call.task, language=call.language, duration=call.duration, text=text,
            segments=_segments(call, outputs)))
    return await json_response(TranscriptionResponse(
        text=text, usage=TranscriptionUsage(seconds=math.ceil(call.duration))))


async def _stream(call: _Call, streams: list[AsyncGenerator[RequestOutput, None]]) -> AsyncIterator[str]:
    """Every clip runs at once; their texts go out in clip order (a later clip's outputs wait for the earlier)."""
    tracker = DeltaTracker()
    latest: dict[int, RequestOutput] = {}
    current = 0
    kind = "transcription.chunk" if call.task == "transcribe" else "translation.chunk"
    try:
        async with aclosing(merge_async_iterators(*streams)) as merged:
            async for i, output in merged:
                latest[i] = output
                while current in latest:
                    c = latest[current].outputs[0]
                    delta = tracker.delta(current, c)
                    if delta is not None:
                        choice = TranscriptionStreamChoice(delta=DeltaMessage(content=delta.text),
                                                           finish_reason=delta.finish_reason,
                                                           stop_reason=delta.stop_reason)
                        yield sse(TranscriptionStreamResponse(id=call.id, object=kind, model=call.model,
                                                              choices=[choice]))
                    if not c.finished():
                        break
                    current += 1
        if call.request.stream_include_usage:
            prompt = sum(len(out.prompt_token_ids) for out in latest.values())
            completion = sum(len(out.outputs[0].token_ids) for out in latest.values())
            usage = StreamUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
            yield sse(TranscriptionStreamResponse(id=call.id, object=kind, model=call.model, choices=[], usage=usage))
    except Exception as exc:  # the status line is sent already: report the error in the stream
        logger.exception("transcription stream %s failed", call.id)
        yield sse(error_body_for(exc))
    yield SSE_DONE



"""/v1/audio/transcriptions and /v1/audio/translations through the official openai client and httpx, against a
tiny Whisper server: every response format, streaming as vLLM streams, long audio as segments at their true
offsets, and 400s for bad input."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import soundfile

from loomserve.modalities.audio_split import split_audio
from loomserve.platform.request import SamplingParams
from loomserve.testing.server import Server
from loomserve.testing.whisper_checkpoints import tiny_whisper_checkpoint

RATE = 16000


def _wav(samples: np.ndarray) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, samples, RATE, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def _tone(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * 300 * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


SHORT = _tone(3.0)
LONG = np.concatenate([_tone(29.6, 1), np.zeros(RATE // 5, np.float32), _tone(12.0, 2)])


@pytest.fixture(scope="module")
def checkpoint() -> str:
    return str(tiny_whisper_checkpoint(max_target_positions=64))


@pytest.fixture(scope="module")
def whisper_server(serve_checkpoint, checkpoint) -> Iterator[Server]:
    with serve_checkpoint(checkpoint, "--max-audio-seconds-per-request", "60") as s:
        yield s


@pytest.fixture(scope="module")
def model(whisper_server: Server) -> str:
    return whisper_server.model


@pytest.fixture(scope="module")
def client(whisper_server: Server):
    return whisper_server.client()


@pytest.fixture(scope="module")
def http(whisper_server: Server) -> Iterator[httpx.Client]:
    with whisper_server.http() as c:
        yield c


@pytest.fixture(scope="module")
def expected(checkpoint):
    """The offline engine's greedy text of a clip (tests/platform/test_whisper.py ties it to transformers')."""
    from loomserve import LLM

    llm = LLM(checkpoint)
    tokenizer = llm.get_tokenizer()

    def text(clips: list[np.ndarray], task: str = "transcribe", language: str = "en", previous: str = "") -> list[str]:
        head = [tokenizer.convert_tokens_to_ids("<|startofprev|>"), *tokenizer.encode(previous)] if previous else []
        prompt = head + tokenizer.convert_tokens_to_ids(
            ["<|startoftranscript|>", f"<|{language}|>", f"<|{task}|>", "<|notimestamps|>"])
        params = SamplingParams(temperature=0.0, max_tokens=64 - len(prompt))
        outputs = llm.generate([{"prompt_token_ids": prompt, "multi_modal_data": {"audio": (c, RATE)}}
                                for c in clips], params)
        return [o.outputs[0].text for o in outputs]

    return text


def _transcribe(client, model, audio=SHORT, **kwargs):
    return client.audio.transcriptions.create(model=model, file=("clip.wav", _wav(audio)), temperature=0.0,
                                              **kwargs)


def test_json_transcription_is_the_greedy_text_with_duration_usage(client, model, expected):
    result = _transcribe(client, model, language="en")
    assert result.text == expected([SHORT])[0]
    assert result.usage.type == "duration" and result.usage.seconds == 3


def test_translation_uses_the_translate_task(client, model, expected):
    result = client.audio.translations.create(model=model, file=("clip.wav", _wav(SHORT)), temperature=0.0)
    assert result.text == expected([SHORT], task="translate")[0]


def test_text_format_is_the_plain_text(client, model, expected):
    assert _transcribe(client, model, response_format="text") == expected([SHORT])[0]


def test_long_audio_is_cut_at_a_quiet_point_into_segments_at_true_offsets(client, model, expected):
    result = _transcribe(client, model, LONG, response_format="verbose_json", timestamp_granularities=["segment"])
    clips = split_audio(LONG, RATE)
    texts = expected([c.samples for c in clips])
    assert [s.text for s in result.segments] == texts and result.text == "".join(texts)
    assert [(s.start, s.end) for s in result.segments] == [
        (c.offset / RATE, (c.offset + len(c.samples)) / RATE) for c in clips]
    assert 29.6 <= result.segments[1].start <= 29.8
    assert result.duration == pytest.approx(len(LONG) / RATE) and result.language == "en"


def _cue(start: float, end: float, decimal: str) -> str:
    def stamp(seconds: float) -> str:
        ms = round(seconds * 1000)
        return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{decimal}{ms % 1000:03d}"

    return f"{stamp(start)} --> {stamp(end)}"


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_subtitles_time_each_segment_at_its_offset(client, model, fmt):
    subtitles = _transcribe(client, model, LONG, response_format=fmt)
    decimal = "," if fmt == "srt" else "."
    cues = [_cue(c.offset / RATE, (c.offset + len(c.samples)) / RATE, decimal) for c in split_audio(LONG, RATE)]
    assert [line for line in subtitles.splitlines() if " --> " in line] == cues
    assert subtitles.startswith("WEBVTT") == (fmt == "vtt")


@pytest.mark.parametrize(("task", "kind"), [("transcribe", "transcription.chunk"), ("translate", "translation.chunk")])
def test_stream_sends_chunks_clip_after_clip_that_add_up_to_the_text(http, model, expected, task, kind):
    files = {"file": ("clip.wav", _wav(LONG), "audio/wav")}
    data = {"model": model, "stream": "true", "stream_include_usage": "true", "temperature": "0"}
    path = "/v1/audio/transcriptions" if task == "transcribe" else "/v1/audio/translations"
    with http.stream("POST", path, files=files, data=data) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {kind}
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks if c["choices"])
    assert text == "".join(expected([c.samples for c in split_audio(LONG, RATE)], task=task))
    assert [c["choices"][0]["finish_reason"] is not None for c in chunks if c["choices"]].count(True) == 2
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_the_openai_client_streams_a_transcription(client, model, expected):
    """As vLLM's own tests read it: each event's choices[0]["delta"]["content"]."""
    stream = _transcribe(client, model, stream=True)
    chunks = list(stream)
    assert {c.object for c in chunks} == {"transcription.chunk"}
    assert "".join(c.choices[0]["delta"]["content"] for c in chunks) == expected([SHORT])[0]


def _error(http, data, content: bytes | None = None, path="/v1/audio/transcriptions"):
    files = {"file": ("clip.wav", _wav(SHORT) if content is None else content, "audio/wav")}
    response = http.post(path, files=files, data=data)
    return response.status_code, response.json()["error"]


def test_max_completion_tokens_caps_each_clip(http, model):
    files = {"file": ("clip.wav", _wav(LONG), "audio/wav")}
    data = {"model": model, "response_format": "verbose_json", "max_completion_tokens": "3", "temperature": "0"}
    segments = http.post("/v1/audio/transcriptions", files=files, data=data).json()["segments"]
    assert [len(s["tokens"]) for s in segments] == [3, 3]


def test_a_sampling_value_out_of_range_is_a_400(http, model):
    status, error = _error(http, {"model": model, "top_p": "5"})
    assert status == 400 and "top_p" in error["message"]


def _m4a(samples: np.ndarray) -> bytes:
    """AAC in an MP4 container, as phones record (soundfile cannot read it)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=RATE)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(samples[None], format="flt", layout="mono")
        frame.sample_rate = RATE
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buf.getvalue()


def test_an_m4a_upload_is_decoded_through_ffmpeg(client, model):
    result = client.audio.transcriptions.create(model=model, file=("clip.m4a", _m4a(SHORT)), temperature=0.0,
                                                response_format="verbose_json")
    assert result.text and result.duration == pytest.approx(3.0, abs=0.1)


def test_a_file_that_is_not_audio_is_a_400(http, model):
    status, error = _error(http, {"model": model}, b"this is not audio")
    assert status == 400 and error["param"] == "file" and "cannot decode" in error["message"]


def test_audio_over_the_request_limit_is_a_400(http, model):
    status, error = _error(http, {"model": model}, _wav(np.zeros(61 * RATE, np.float32)))
    assert status == 400 and error["param"] == "file" and "60 seconds of audio" in error["message"]


def test_an_unknown_language_is_a_400(http, model):
    status, error = _error(http, {"model": model, "language": "xx"})
    assert status == 400 and error["param"] == "language"


def test_a_prompt_that_fills_the_decoder_is_a_400(http, model):
    status, error = _error(http, {"model": model, "prompt": "the quick brown fox " * 40})
    assert status == 400 and error["param"] == "prompt"


def test_a_prompt_goes_before_the_start_of_transcript(client, model, expected):
    """vLLM's decoder prompt: <|startofprev|> prompt <|startoftranscript|><|en|><|transcribe|><|notimestamps|>."""
    assert _transcribe(client, model, prompt="hello world").text == expected([SHORT], previous="hello world")[0]


def test_a_bad_response_format_is_a_400(http, model):
    status, error = _error(http, {"model": model, "response_format": "docx"})
    assert status == 400 and error["param"] == "response_format"


def test_a_missing_file_is_a_400(http, model):
    response = http.post("/v1/audio/transcriptions", data={"model": model})
    assert response.status_code == 400 and response.json()["error"]["param"] == "file"


def test_an_unknown_model_is_a_404(http):
    status, error = _error(http, {"model": "no-such-model"})
    assert status == 404 and error["param"] == "model"


def test_a_model_that_is_not_whisper_is_a_400(server):
    """The shared tiny qwen2 server (tests/api/conftest.py) generates text but cannot transcribe."""
    with server.http() as text_http:
        status, error = _error(text_http, {"model": server.model})
    assert status == 400 and error["param"] == "model" and "speech-to-text" in error["message"]


def test_a_completion_without_audio_is_a_400_at_the_text_route(http, model):
    response = http.post("/v1/completions", json={"model": model, "prompt": "hello"})
    assert response.status_code == 400 and "/v1/audio/transcriptions" in response.json()["error"]["message"]

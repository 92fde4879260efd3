"""Timed segments as SubRip (srt) and WebVTT subtitles."""

from __future__ import annotations

from collections.abc import Sequence

from loomserve.api.protocol_transcription import TranscriptionSegment


def _timestamp(seconds: float, decimal: str) -> str:
    ms = round(seconds * 1000)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{ms:03d}"


def to_srt(segments: Sequence[TranscriptionSegment]) -> str:
    cues = [f"{i}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text.strip()}\n"
            for i, s in enumerate(segments, start=1)]
    return "\n".join(cues)


def to_vtt(segments: Sequence[TranscriptionSegment]) -> str:
    cues = [f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text.strip()}\n" for s in segments]
    return "\n".join(["WEBVTT\n", *cues])

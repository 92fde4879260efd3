"""Long audio cut for Whisper as vLLM cuts it: clips of at most 30 s, each cut at the quietest 0.1 s window of the
last second before the limit, clips covering the audio end to end with their true offsets."""

from __future__ import annotations

import numpy as np

from loomserve.modalities.audio_split import split_audio

RATE = 16000


def _noise(seconds: float, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(int(seconds * RATE)).astype(np.float32)


def test_audio_of_at_most_30_seconds_is_one_clip():
    audio = _noise(30.0)
    clips = split_audio(audio, RATE)
    assert len(clips) == 1 and clips[0].offset == 0 and len(clips[0].samples) == len(audio)


def test_cut_falls_in_the_quiet_window_of_the_last_second():
    audio = _noise(50.0)
    quiet = int(29.4 * RATE)
    audio[quiet : quiet + RATE // 10] = 0.0
    clips = split_audio(audio, RATE)
    assert [c.offset for c in clips] == [0, quiet]


def test_clips_cover_long_audio_end_to_end_each_within_30_seconds():
    audio = _noise(100.0, seed=1)
    clips = split_audio(audio, RATE)
    assert all(len(c.samples) <= 30 * RATE for c in clips)
    assert np.array_equal(np.concatenate([c.samples for c in clips]), audio)
    assert [c.offset for c in clips] == list(np.cumsum([0] + [len(c.samples) for c in clips[:-1]]))

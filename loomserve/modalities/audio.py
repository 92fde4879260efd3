"""Audio: decoding (soundfile), resampling (librosa) and Whisper's log-mel features.

`log_mel_features` computes what `WhisperFeatureExtractor` computes on CPU with torch: the clip zero-padded
(or cut) to 30 s, a centred STFT with a 400-point Hann window and hop 160, power spectrum without the last
frame, a Slaney mel filter bank (librosa's), log10 clamped at 1e-10 and at max - 8, then (x + 4) / 4.
librosa and soundfile are imported only here, so the engine runs without them.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from loomserve.modalities.media import MediaError

if TYPE_CHECKING:
    from loomserve.modalities.budget import MediaSpend

AUDIO_FORMATS = ("wav", "flac", "mp3", "ogg")


def decode_audio(data: bytes, fmt: str | None = None, spend: MediaSpend | None = None) -> tuple[np.ndarray, int]:
    """Encoded bytes -> (mono float32 samples, sampling rate); the clip's length is charged to the request's
    `spend` from its header before any sample is decoded."""
    if fmt is not None and fmt.lower() not in AUDIO_FORMATS:
        raise MediaError(f"unsupported audio format {fmt!r}; use one of {', '.join(AUDIO_FORMATS)}")
    import soundfile

    try:
        if spend is not None:
            header = soundfile.info(io.BytesIO(data))
            spend.charge("audio_seconds", header.frames / header.samplerate)
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except MediaError:
        raise
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise MediaError(f"cannot decode the audio: {exc}") from None
    if samples.shape[0] == 0:
        raise MediaError("the audio clip is empty")
    return samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0], int(rate)


def as_audio(item: object) -> tuple[np.ndarray, int | None]:
    """What the Python API accepts: (samples, rate) or bare samples (taken to be at the model's rate)."""
    samples, rate = item if isinstance(item, tuple) else (item, None)
    samples = np.asarray(samples)
    if samples.ndim != 1 or samples.size == 0 or not np.issubdtype(samples.dtype, np.floating):
        raise MediaError("audio must be a non-empty 1-D float array, or a (samples, sampling_rate) tuple")
    return samples.astype(np.float32, copy=False), rate


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return samples
    import librosa

    return librosa.resample(samples, orig_sr=rate, target_sr=target).astype(np.float32)


def mel_filters(sampling_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """[n_fft // 2 + 1, n_mels] Slaney-scale, Slaney-normalized filters from 0 Hz to Nyquist."""
    import librosa

    return librosa.filters.mel(sr=sampling_rate, n_fft=n_fft, n_mels=n_mels, fmin=0.0, fmax=sampling_rate / 2,
                               htk=False, norm="slaney", dtype=np.float32).T


def log_mel_features(samples: np.ndarray, filters: np.ndarray, n_fft: int, hop: int, num_samples: int) -> np.ndarray:
    """[n_mels, num_samples // hop] Whisper log-mel features of the clip padded or cut to `num_samples`."""
    padded = np.zeros(num_samples, dtype=np.float32)
    n = min(len(samples), num_samples)
    padded[:n] = samples[:n]
    waveform = torch.from_numpy(padded)
    stft = torch.stft(waveform, n_fft, hop, window=torch.hann_window(n_fft), return_complex=True)
    magnitudes = (stft[..., :-1].abs() ** 2).contiguous()  # [n_fft // 2 + 1, frames]
    mel = torch.from_numpy(filters).T @ magnitudes  # [n_mels, frames]
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).numpy()


def encoder_lengths(num_frames: int) -> tuple[int, int]:
    """Whisper-style encoder: (positions after the stride-2 convolution, tokens after the 2x average pool)."""
    conv = (num_frames - 1) // 2 + 1
    return conv, (conv - 2) // 2 + 1


def num_feature_frames(num_samples: int, hop: int) -> int:
    """Frames the feature extractor's attention mask marks valid: one per started hop."""
    return math.ceil(num_samples / hop)

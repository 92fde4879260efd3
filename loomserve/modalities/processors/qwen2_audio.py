"""Qwen2-Audio: 16 kHz Whisper log-mel features and one `<|AUDIO|>` per audio-encoder output frame.

Items carry `input_features` [n_mels, F] float32: the leading frames of what `WhisperFeatureExtractor`
computes on the clip padded to 30 s, as many as the encoder's convolutions read to produce the clip's
outputs (its valid frames plus the padding frames next to them).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from loomserve.modalities.audio import (
    as_audio,
    encoder_lengths,
    log_mel_features,
    mel_filters,
    num_feature_frames,
    resample,
)
from loomserve.modalities.hashing import content_hash
from loomserve.modalities.media import MediaError
from loomserve.modalities.processors.base import MultiModalProcessor, ProcessedItem, read_json


class Qwen2AudioProcessor(MultiModalProcessor):
    placeholders = {"audio": "<|audio_bos|><|AUDIO|><|audio_eos|>"}
    placeholder_tokens = {"audio": "<|AUDIO|>"}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = read_json(self.model_path, "preprocessor_config.json")
        self.rate = int(cfg.get("sampling_rate", 16000))
        self.hop = int(cfg.get("hop_length", 160))
        self.n_fft = int(cfg.get("n_fft", 400))
        self.num_samples = int(cfg.get("chunk_length", 30)) * self.rate
        self.n_mels = int(cfg.get("feature_size", 128))
        self._filters: np.ndarray | None = None

    def process_item(self, modality: str, item: Any) -> ProcessedItem:
        samples, rate = as_audio(item)
        samples = resample(samples, rate or self.rate, self.rate)
        frames = min(num_feature_frames(len(samples), self.hop), self.num_samples // self.hop)
        conv, tokens = encoder_lengths(frames)
        if tokens < 1:
            raise MediaError(f"the audio clip is too short ({len(samples)} samples at {self.rate} Hz)")
        if self._filters is None:
            self._filters = mel_filters(self.rate, self.n_fft, self.n_mels)
        features = log_mel_features(samples, self._filters, self.n_fft, self.hop, self.num_samples)
        needed = min(2 * conv + 1, features.shape[1])
        return ProcessedItem(
            data={"input_features": torch.from_numpy(np.ascontiguousarray(features[:, :needed]))},
            num_tokens=tokens,
            content_hash=content_hash("audio", {"rate": self.rate, "n_mels": self.n_mels},
                                      samples[: self.num_samples]),
            meta={"num_frames": frames},
        )

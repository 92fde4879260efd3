"""Whisper: one audio clip of at most 30 s per request, the encoder's input; the decoder prompt holds no placeholder.

The item carries `input_features` [n_mels, 3000]: `WhisperFeatureExtractor`'s log-mel features of the clip
zero-padded to 30 s (the encoder always reads 30 s). Its placeholder is empty, at the prompt's start: the decoder
reaches the audio through cross-attention (`platform/cross_kv_store.py`), not through embeddings in its prompt.
Longer audio is split before it gets here (`api/serving_transcription.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from loomserve.modalities.audio import as_audio, log_mel_features, mel_filters, resample
from loomserve.modalities.hashing import content_hash
from loomserve.modalities.inputs import MultiModalItem, PlaceholderRange
from loomserve.modalities.media import MediaError
from loomserve.modalities.processors.base import ProcessedItem
from loomserve.modalities.processors.qwen2_audio import Qwen2AudioProcessor


class WhisperProcessor(Qwen2AudioProcessor):  # Qwen2-Audio reads the same Whisper feature-extractor config
    placeholders = {"audio": ""}
    placeholder_tokens: dict[str, str] = {}

    def process_item(self, modality: str, item: Any) -> ProcessedItem:
        samples, rate = as_audio(item)
        samples = resample(samples, rate or self.rate, self.rate)
        if len(samples) > self.num_samples:
            raise MediaError(f"Whisper takes at most {self.num_samples // self.rate} s of audio per prompt, got "
                             f"{len(samples) / self.rate:.1f} s (the transcription endpoints split longer audio)")
        if self._filters is None:
            self._filters = mel_filters(self.rate, self.n_fft, self.n_mels)
        features = log_mel_features(samples, self._filters, self.n_fft, self.hop, self.num_samples)
        return ProcessedItem(
            data={"input_features": torch.from_numpy(np.ascontiguousarray(features))},
            num_tokens=0,
            content_hash=content_hash("audio", {"rate": self.rate, "n_mels": self.n_mels}, samples),
            meta={},
        )

    def apply(self, token_ids: Sequence[int], mm_data: dict[str, list[Any]]) -> tuple[list[int], list[MultiModalItem]]:
        """The decoder prompt unchanged and its one clip as the encoder's input."""
        self.check_counts({m: len(items) for m, items in mm_data.items()})
        clips = mm_data.get("audio", [])
        if len(clips) != 1:
            raise MediaError(f"a Whisper prompt takes exactly one audio clip, got {len(clips)}")
        p = self.process("audio", clips[0])
        return list(token_ids), [MultiModalItem("audio", p.content_hash, PlaceholderRange(0, 0), p.data, p.meta)]

"""Long audio cut into clips an encoder of fixed length takes (Whisper: 30 s), at quiet points, as vLLM does: each
cut falls in the last `overlap_s` seconds before the limit, at the start of the 0.1 s window of least energy there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class AudioClip:
    offset: int  # samples from the start of the whole audio
    samples: np.ndarray  # [n] float32 mono


def quietest_window(samples: np.ndarray, window: int) -> int:
    """Start of the `window`-sample window of least RMS energy in `samples` (0 when shorter than a window)."""
    n = (len(samples) // window) * window
    if n == 0:
        return 0
    energy = np.sqrt(np.mean(samples[:n].reshape(-1, window) ** 2, axis=1))  # [n // window]
    return int(np.argmin(energy)) * window


def split_audio(samples: np.ndarray, rate: int, max_s: float = 30.0, overlap_s: float = 1.0,
                window_s: float = 0.1) -> list[AudioClip]:
    """Clips of at most `max_s` seconds covering `samples` end to end."""
    limit, overlap, window = int(max_s * rate), int(overlap_s * rate), max(1, int(window_s * rate))
    clips, start = [], 0
    while len(samples) - start > limit:
        search = start + limit - overlap
        cut = search + quietest_window(samples[search : start + limit], window)
        clips.append(AudioClip(start, samples[start:cut]))
        start = cut
    clips.append(AudioClip(start, samples[start:]))
    return clips

"""Seeded media for the multimodal tests: noise images and videos, tones, and their encoded forms."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def noise_image(height: int, width: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


def noise_video(frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """[T, H, W, 3] uint8 frames that drift slowly, like a video."""
    rng = np.random.RandomState(seed)
    base = rng.randint(0, 256, (height, width, 3)).astype(np.int64)
    return np.stack([(base + 9 * t) % 256 for t in range(frames)]).astype(np.uint8)


def tone(seconds: float, seed: int, rate: int = 16000) -> np.ndarray:
    rng = np.random.RandomState(seed)
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * (220 + 100 * seed) * t) + 0.05 * rng.randn(t.size)).astype(np.float32)


def png_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def wav_base64(samples: np.ndarray, rate: int = 16000) -> str:
    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format="WAV", subtype="FLOAT")
    return base64.b64encode(buf.getvalue()).decode()


def mp4_bytes(frames: np.ndarray, fps: int) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


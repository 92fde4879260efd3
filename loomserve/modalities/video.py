"""Videos: decoding with PyAV, frame sampling by frame rate or count (as HF's Qwen2-VL video processor
samples), and the Python API's accepted forms. PyAV is imported only here."""

from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from loomserve.modalities.image import as_pil, check_pixels, decode_image, to_rgb
from loomserve.modalities.media import MediaError

if TYPE_CHECKING:
    from loomserve.modalities.budget import MediaSpend

DEFAULT_FPS = 2.0  # frames per second a video is taken to have when nobody says (qwen-vl-utils' default)
MAX_VIDEO_PIXELS_FACTOR = 4  # all sampled frames together: at most this many images' worth of pixels
JPEG_FRAMES = "data:video/jpeg;base64,"  # vLLM's multi-frame URL: this prefix, then base64 JPEGs joined by commas


@dataclass
class VideoInput:
    frames: np.ndarray  # [T, H, W, 3] uint8 RGB
    fps: float  # frames per second of `frames` as sampled


def sample_indices(total: int, video_fps: float, fps: float | None, num_frames: int | None, multiple: int,
                   min_frames: int, max_frames: int) -> np.ndarray:
    """Which of `total` frames to keep: `num_frames` evenly spread, or as many as `fps` gives, within
    [min_frames, max_frames], rounded down to a multiple of the temporal patch."""
    if num_frames is not None:
        count = round(num_frames / multiple) * multiple
    else:
        top = math.floor(min(max_frames, total) / multiple) * multiple
        count = total / video_fps * (fps or DEFAULT_FPS)
        count = math.floor(min(max(count, min_frames), top, total) / multiple) * multiple
    if count < 1:
        raise MediaError(f"the video has {total} frames, too few to sample")
    if count > total:
        raise MediaError(f"cannot sample {count} frames from a video of {total}")
    return torch.arange(0, total, total / count).int().numpy()


def decode_video(data: bytes, max_pixels: int, fps: float | None, num_frames: int | None, multiple: int,
                 min_frames: int, max_frames: int, spend: MediaSpend | None = None) -> VideoInput:
    """Encoded bytes -> the sampled RGB frames and the frame rate they represent. Only sampled frames are
    kept, and their pixels together stay under MAX_VIDEO_PIXELS_FACTOR x the image pixel cap; their count and
    pixels are charged to the request's `spend` before any is decoded."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            check_pixels(width, height, max_pixels)
            video_fps = float(stream.average_rate or DEFAULT_FPS)
            total = stream.frames or sum(1 for _ in container.decode(stream))
            indices = sample_indices(total, video_fps, fps, num_frames, multiple, min_frames, max_frames)
            if len(indices) * width * height > MAX_VIDEO_PIXELS_FACTOR * max_pixels:
                raise MediaError(f"{len(indices)} frames of {width}x{height} exceed the server's pixel limit")
            if spend is not None:
                spend.charge("video_frames", len(indices))
                spend.charge("pixels", len(indices) * width * height)
            container.seek(0)
            wanted = set(indices.tolist())
            kept = {i: f.to_ndarray(format="rgb24") for i, f in enumerate(container.decode(stream)) if i in wanted}
    except MediaError:
        raise
    except Exception as exc:  # av raises InvalidDataError, IndexError (no video stream), ...
        raise MediaError(f"cannot decode the video: {exc}") from None
    if len(kept) != len(wanted):
        raise MediaError(f"the video declares {total} frames but fewer could be decoded")
    return VideoInput(np.stack([kept[i] for i in indices]), video_fps * len(indices) / total)


def is_jpeg_frames(url: str | None) -> bool:
    return url is not None and url[: len(JPEG_FRAMES)].lower() == JPEG_FRAMES


def jpeg_frame_bytes(url: str) -> list[bytes]:
    """The encoded frames of a `data:video/jpeg;base64,<jpeg>,<jpeg>,...` URL."""
    try:
        return [base64.b64decode(part, validate=True) for part in url[len(JPEG_FRAMES):].split(",")]
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"a frame of the video/jpeg data URL is not valid base64 ({exc})") from None


def decode_jpeg_frames(url: str, max_pixels: int, spend: MediaSpend | None = None) -> VideoInput:
    """vLLM's multi-frame JPEG video: every frame in order (none sampled away), taken at DEFAULT_FPS as a list of
    images is; each frame is checked and charged as an image, all of them as a video's frames."""
    images = [to_rgb(decode_image(frame, max_pixels, spend)) for frame in jpeg_frame_bytes(url)]
    if len({image.size for image in images}) != 1:
        raise MediaError("the frames of a video/jpeg data URL must all have the same size")
    width, height = images[0].size
    if len(images) * width * height > MAX_VIDEO_PIXELS_FACTOR * max_pixels:
        raise MediaError(f"{len(images)} frames of {width}x{height} exceed the server's pixel limit")
    if spend is not None:
        spend.charge("video_frames", len(images))
    return VideoInput(np.stack([np.asarray(image) for image in images]), DEFAULT_FPS)


def as_video(item: object) -> VideoInput:
    """Python API forms: a VideoInput, a [T, H, W, 3] uint8 array or a list of images (all frames used,
    at DEFAULT_FPS), or either of those with {"fps": ...} as (frames, metadata)."""
    if isinstance(item, VideoInput):
        return item
    frames, meta = item if isinstance(item, tuple) else (item, {})
    if isinstance(frames, np.ndarray) and frames.ndim == 4 and frames.dtype == np.uint8 and frames.shape[-1] == 3:
        array = frames
    elif isinstance(frames, (list, np.ndarray)) and len(frames) > 0:
        array = np.stack([np.asarray(to_rgb(as_pil(f))) for f in frames])
    else:
        raise MediaError("a video must be a [T, H, W, 3] uint8 array or a list of images")
    return VideoInput(array, float(meta.get("fps", DEFAULT_FPS)))

"""Images: decoding with a pixel cap, and the steps of the HF image processors done the same way.

Each step repeats what transformers' PIL image processors (`Qwen2VLImageProcessorPil`,
`CLIPImageProcessorPil`) do, in the same order and dtypes, so the pixels equal theirs: RGB conversion
over a white background, PIL resampling and cropping on uint8, rescale in float64 then float32, normalize in
float32. The float steps run on the engine's device through a table made with `normalize` (`pixels.py`).
"""

from __future__ import annotations

import io
import math
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from loomserve.modalities.media import MediaError

if TYPE_CHECKING:
    from loomserve.modalities.budget import MediaSpend

BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the value HF processor configs store as "resample"


def decode_image(data: bytes, max_pixels: int, spend: MediaSpend | None = None) -> Image.Image:
    """Encoded bytes -> a loaded PIL image; the size is checked (and charged to the request's `spend`) from the
    header before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            check_pixels(image.width, image.height, max_pixels)
            if spend is not None:
                spend.charge("pixels", image.width * image.height)
            image.load()
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise MediaError(f"the image has more pixels than the server's limit of {max_pixels}") from None
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise MediaError(f"cannot decode the image: {exc}") from None
    return image


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise MediaError(f"the image is {width}x{height} = {width * height} pixels, over the server's limit of "
                         f"{max_pixels}")
    if width < 1 or height < 1:
        raise MediaError(f"the image is {width}x{height}: it has no pixels")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, compositing any transparency onto white (as transformers' `convert_to_rgb`)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def as_pil(image: object) -> Image.Image:
    """A PIL image from what the Python API accepts: PIL images and HWC uint8 arrays."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim in (2, 3):
        return Image.fromarray(image)
    raise MediaError(f"an image must be a PIL.Image or an HxWxC uint8 array, got {type(image).__name__}")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: both sides multiples of `factor`, area within [min_pixels, max_pixels], aspect
    ratio kept as closely as possible."""
    if max(height, width) / min(height, width) > 200:
        raise MediaError(f"the image aspect ratio must be under 200, got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """CLIP's resize target: the shorter side becomes `shortest_edge`, the longer one scales (floored)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def resize(image: Image.Image, height: int, width: int, resample: int = BICUBIC) -> np.ndarray:
    """RGB image -> [H, W, 3] uint8 at the new size."""
    return np.asarray(image.resize((width, height), resample=resample))


def center_crop(hwc: np.ndarray, height: int, width: int) -> np.ndarray:
    """[H, W, C] -> [height, width, C] around the center, zero-padding an image smaller than the crop (on uint8,
    before rescaling, as the HF processors crop)."""
    h, w = hwc.shape[:2]
    if h < height or w < width:
        padded = np.zeros((max(h, height), max(w, width), hwc.shape[2]), dtype=hwc.dtype)
        top, left = math.ceil((padded.shape[0] - h) / 2), math.ceil((padded.shape[1] - w) / 2)
        padded[top : top + h, left : left + w] = hwc
        hwc, h, w = padded, padded.shape[0], padded.shape[1]
    top, left = (h - height) // 2, (w - width) // 2
    return hwc[top : top + height, left : left + width]


def normalize(hwc: np.ndarray, rescale_factor: float, mean: list[float], std: list[float]) -> np.ndarray:
    """[H, W, C] uint8 -> [C, H, W] float32: x * rescale_factor (in float64), then (x - mean) / std in float32."""
    x = (np.moveaxis(hwc, -1, 0).astype(np.float64) * rescale_factor).astype(np.float32)
    mean32, std32 = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    return ((x.T - mean32) / std32).T

"""Images and video frames cross to the engine as uint8 pixels; their float `pixel_values` are made there, on the
model's device, just before the vision tower.

The front end does the geometric steps of the HF image processors on uint8 (RGB conversion, resize, crop), as they
do. Their float steps (rescale in float64 then float32, normalize in float32) map each byte value of each channel to
one float32, whatever its neighbours: so a [3, 256] table made once on the host in the processors' own arithmetic
turns pixels into `pixel_values` with one gather on the device, equal to the HF output bit for bit, at a quarter of
the bytes on the wire and no float work in the front end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from loomserve.modalities.inputs import MultiModalItem

PIXELS = "pixels"  # [..., H, W, 3] uint8, channels last (F frames first for a video)
PIXEL_TABLE = "pixel_table"  # [3, 256] float32: the float value of each byte value in each channel


def pixel_table(float_steps: Callable[[np.ndarray], np.ndarray]) -> torch.Tensor:
    """[3, 256] float32 from `float_steps`, the processor's rescale and normalize of an [H, W, 3] uint8 image into
    [3, H, W] float32, applied to the image of one row holding every byte value in every channel."""
    every_byte = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # [1, 256, 3]
    table = np.asarray(float_steps(every_byte), dtype=np.float32).reshape(3, 256)
    return torch.from_numpy(np.ascontiguousarray(table))


def uint8_pixels(hwc: np.ndarray, table: torch.Tensor) -> dict[str, torch.Tensor]:
    """An item's data: its uint8 pixels [..., H, W, 3] and the table that turns them into `pixel_values`."""
    array = np.ascontiguousarray(hwc, dtype=np.uint8)
    if not array.flags.writeable:  # PIL's arrays are read-only views; torch wants to own writable memory
        array = array.copy()
    return {PIXELS: torch.from_numpy(array), PIXEL_TABLE: table}


def pixel_values(pixels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """[..., H, W, 3] uint8 -> [..., 3, H, W] float32 on the pixels' device: table[channel, byte]."""
    offsets = torch.arange(3, device=pixels.device) * 256  # channel c reads row c of the flat table
    index = pixels.movedim(-1, -3).long() + offsets.view(3, 1, 1)  # [..., 3, H, W]
    return table.to(pixels.device).flatten()[index]


def with_pixel_values(item: MultiModalItem, device: torch.device) -> MultiModalItem:
    """The item as its encoder takes it: uint8 pixels replaced by `pixel_values` made on `device` (other items and
    data as they are). The request keeps its own item: only the encoder sees the float copy."""
    if PIXELS not in item.data:
        return item
    data = {k: v for k, v in item.data.items() if k not in (PIXELS, PIXEL_TABLE)}
    pixels = item.data[PIXELS].to(device, non_blocking=True)
    data["pixel_values"] = pixel_values(pixels, item.data[PIXEL_TABLE])
    return dataclasses.replace(item, data=data)

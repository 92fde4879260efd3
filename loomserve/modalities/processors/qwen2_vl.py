"""Qwen2-VL and Qwen2.5-VL: dynamic-resolution images and videos (smart resize to multiples of
patch x merge), one `<|image_pad|>` / `<|video_pad|>` per merged patch.

Items carry resized frames as uint8 `pixels` [F, H, W, 3] (F = 1 for an image; a video's frames are padded to
a multiple of the temporal patch by repeating the last) with their `pixel_table` (`pixels.py`), and `grid_thw` [3]
int64 in patches; on the engine's device they become `pixel_values` [F, 3, H, W] float32, which the vision tower
cuts into patches. Images equal `Qwen2VLImageProcessorPil`'s output.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from loomserve.modalities.hashing import content_hash
from loomserve.modalities.image import as_pil, normalize, resize, smart_resize, to_rgb
from loomserve.modalities.media import MediaError
from loomserve.modalities.pixels import pixel_table, uint8_pixels
from loomserve.modalities.processors.base import MultiModalProcessor, ProcessedItem, read_json
from loomserve.modalities.video import as_video

_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_VIDEO_DEFAULTS = {"min_pixels": 128 * 28 * 28, "max_pixels": 768 * 28 * 28, "fps": 2.0, "min_frames": 4,
                   "max_frames": 768}


def _pixels(cfg: dict[str, Any], defaults: dict[str, Any]) -> tuple[int, int]:
    size = cfg.get("size") or {}
    low = cfg.get("min_pixels", size.get("shortest_edge", defaults["min_pixels"]))
    high = cfg.get("max_pixels", size.get("longest_edge", defaults["max_pixels"]))
    return int(low), int(high)


class Qwen2VLProcessor(MultiModalProcessor):
    placeholders = {"image": "<|vision_start|><|image_pad|><|vision_end|>",
                    "video": "<|vision_start|><|video_pad|><|vision_end|>"}
    placeholder_tokens = {"image": "<|image_pad|>", "video": "<|video_pad|>"}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        image_cfg = read_json(self.model_path, "preprocessor_config.json")
        video_cfg = {**image_cfg, **read_json(self.model_path, "video_preprocessor_config.json")}
        self.patch = int(image_cfg.get("patch_size", 14))
        self.merge = int(image_cfg.get("merge_size", 2))
        self.temporal = int(image_cfg.get("temporal_patch_size", 2))
        self.mean = image_cfg.get("image_mean", _CLIP_MEAN)
        self.std = image_cfg.get("image_std", _CLIP_STD)
        rescale = float(image_cfg.get("rescale_factor", 1 / 255))
        self.table = pixel_table(lambda hwc: normalize(hwc, rescale, self.mean, self.std))
        self.resample = int(image_cfg.get("resample", 3))
        self.image_pixels = _pixels(image_cfg, {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280})
        self.video_pixels = _pixels(video_cfg, _VIDEO_DEFAULTS)
        io = self.mm_config.media_io_kwargs.get("video", {})
        self.video_sampling = {
            "fps": io.get("fps", video_cfg.get("fps", _VIDEO_DEFAULTS["fps"])) if "num_frames" not in io else None,
            "num_frames": io.get("num_frames"),
            "multiple": self.temporal,
            "min_frames": int(video_cfg.get("min_frames", _VIDEO_DEFAULTS["min_frames"])),
            "max_frames": int(video_cfg.get("max_frames", _VIDEO_DEFAULTS["max_frames"])),
        }

    def _frames(self, frames: list[Any], pixels: tuple[int, int]) -> tuple[np.ndarray, int, int]:
        """RGB frames -> [F, H, W, 3] uint8 at the smart-resized size."""
        height, width = smart_resize(frames[0].height, frames[0].width, self.patch * self.merge, *pixels)
        return np.stack([resize(f, height, width, self.resample) for f in frames]), height, width

    def process_item(self, modality: str, item: Any) -> ProcessedItem:
        if modality == "image":
            rgb = to_rgb(as_pil(item))
            frames, height, width = self._frames([rgb], self.image_pixels)
            raw, meta = np.asarray(rgb), {}
        else:
            video = as_video(item)
            raw = video.frames
            pil = [as_pil(f) for f in raw]
            frames, height, width = self._frames(pil, self.video_pixels)
            if pad := -len(frames) % self.temporal:
                frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
            meta = {"second_per_grid": self.temporal / video.fps}
        grid = (len(frames) // self.temporal if modality == "video" else 1, height // self.patch, width // self.patch)
        settings = {"size": [height, width], "mean": self.mean, "std": self.std, **meta}
        return ProcessedItem(
            data={**uint8_pixels(frames, self.table), "grid_thw": torch.tensor(grid, dtype=torch.int64)},
            num_tokens=grid[0] * grid[1] * grid[2] // self.merge**2,
            content_hash=content_hash(modality, settings, raw),
            meta=meta,
        )

    def grid_tokens(self, grid: torch.Tensor) -> int:
        return int(grid.prod()) // self.merge**2

    def embeds_extras(self, modality: str, num_rows: int, extras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The item's grid (its M-RoPE positions come from it), which must give as many tokens as rows."""
        grid = extras.get("grid_thw")
        if grid is None:
            raise MediaError(f"{modality}_embeds for this model need {modality}_grid_thw: give "
                             f"{{'{modality}_embeds': ..., '{modality}_grid_thw': ...}}")
        if grid.shape != (3,) or self.grid_tokens(grid) != num_rows:
            raise MediaError(f"{modality}_grid_thw {grid.tolist()} does not fit {num_rows} {modality}_embeds rows")
        return {"grid_thw": grid}

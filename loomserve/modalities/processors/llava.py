"""LLaVA: CLIP preprocessing (shortest-edge resize, center crop) and one `<image>` per vision feature.

Items carry the resized and cropped image as uint8 `pixels` [H, W, 3] with their `pixel_table` (`pixels.py`); on
the engine's device they become `pixel_values` [3, H, W] float32, equal to `CLIPImageProcessorPil`'s output.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from loomserve.modalities.hashing import content_hash
from loomserve.modalities.image import as_pil, center_crop, normalize, resize, shortest_edge_size, to_rgb
from loomserve.modalities.pixels import pixel_table, uint8_pixels
from loomserve.modalities.processors.base import MultiModalProcessor, ProcessedItem, read_json
from loomserve.modalities.processors.qwen2_vl import _CLIP_MEAN, _CLIP_STD


class LlavaProcessor(MultiModalProcessor):
    placeholders = {"image": "<image>"}
    placeholder_tokens = {"image": "<image>"}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = read_json(self.model_path, "preprocessor_config.json")
        vision = self.hf_config.vision_config
        size = cfg.get("size", {"shortest_edge": vision.image_size})
        self.shortest_edge = int(size.get("shortest_edge", size.get("height", vision.image_size)))
        crop = cfg.get("crop_size", {"height": vision.image_size, "width": vision.image_size})
        self.crop = (int(crop["height"]), int(crop["width"])) if isinstance(crop, dict) else (int(crop), int(crop))
        mean, std = cfg.get("image_mean", _CLIP_MEAN), cfg.get("image_std", _CLIP_STD)
        rescale = float(cfg.get("rescale_factor", 1 / 255))
        self.table = pixel_table(lambda hwc: normalize(hwc, rescale, mean, std))
        self.resample = int(cfg.get("resample", 3))
        patch = vision.patch_size
        strategy = self.hf_config.vision_feature_select_strategy
        self.num_tokens = (self.crop[0] // patch) * (self.crop[1] // patch) + (0 if strategy == "default" else 1)

    def process_item(self, modality: str, item: Any) -> ProcessedItem:
        rgb = to_rgb(as_pil(item))
        height, width = shortest_edge_size(rgb.height, rgb.width, self.shortest_edge)
        resized = resize(rgb, height, width, self.resample)
        return ProcessedItem(
            data=uint8_pixels(center_crop(resized, *self.crop), self.table),
            num_tokens=self.num_tokens,
            content_hash=content_hash("image", {"size": [height, width], "crop": self.crop}, np.asarray(rgb)),
            meta={},
        )

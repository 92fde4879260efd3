"""CLIP and SigLIP embedding models: an image prompt is the image alone, one placeholder token whose embedding the
image tower makes; preprocessing is the checkpoint's own transformers image processor (`preprocessor_config.json`):
its geometric steps (resize, crop) here on uint8, its rescale and normalize on the engine's device (`pixels.py`).

As in vLLM, the prompt of an image must hold no text (an empty prompt; the tokenizer's special tokens are dropped):
the two towers embed text and images apart, so a prompt of both has no single vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from loomserve.modalities.config import MultiModalConfig
from loomserve.modalities.hashing import content_hash
from loomserve.modalities.image import as_pil, to_rgb
from loomserve.modalities.inputs import MultiModalItem, PlaceholderRange
from loomserve.modalities.media import MediaError
from loomserve.modalities.pixels import pixel_table, uint8_pixels
from loomserve.modalities.processors.base import MultiModalProcessor, ProcessedItem


class ImageEmbeddingProcessor(MultiModalProcessor):
    placeholders = {"image": ""}  # an image prompt has no text to place it in
    takes_embeds = False  # its image encoder's output is the pooled embedding itself
    placeholder_tokens = {}

    def __init__(self, model_path: str, hf_config: Any, tokenizer: Any, mm_config: MultiModalConfig) -> None:
        from transformers import AutoImageProcessor

        super().__init__(model_path, hf_config, tokenizer, mm_config)
        self.image_processor = AutoImageProcessor.from_pretrained(self.model_path)
        self.settings = self.image_processor.to_dict()  # what the image tower sees depends on all of them
        self.table = pixel_table(self._float_steps)
        # Any in-vocabulary id: the text tower's output at this token is replaced by the image's embedding.
        self.placeholder_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.special_ids = set(tokenizer.all_special_ids)

    def _float_steps(self, hwc: np.ndarray) -> np.ndarray:
        """The processor's rescale and normalize alone: [H, W, 3] uint8 -> [3, H, W] float32."""
        out = self.image_processor(images=hwc, do_resize=False, do_center_crop=False, return_tensors="np",
                                   input_data_format="channels_last")
        return out["pixel_values"][0]

    def process_item(self, modality: str, item: Any) -> ProcessedItem:
        rgb = to_rgb(as_pil(item))
        geometry = self.image_processor(images=rgb, do_rescale=False, do_normalize=False, return_tensors="np")
        chw = geometry["pixel_values"][0]  # [3, S, S], uint8 as resized and cropped by PIL
        if chw.dtype != np.uint8:  # a processor that resizes in floats: its pixels are not bytes, the table is wrong
            raise RuntimeError(f"{type(self.image_processor).__name__} resizes to {chw.dtype}, not uint8")
        return ProcessedItem(uint8_pixels(np.moveaxis(chw, 0, -1), self.table), 1,
                             content_hash("image", self.settings, np.asarray(rgb)), {})

    def apply(self, token_ids: Sequence[int], mm_data: dict[str, list[Any]]) -> tuple[list[int], list[MultiModalItem]]:
        """An image prompt -> one placeholder token and its item; MediaError for text beside it or several images."""
        self.check_counts({m: len(items) for m, items in mm_data.items()})
        images = mm_data.get("image", [])
        if len(images) != 1:
            raise MediaError(f"an embedding prompt takes one image, got {len(images)}")
        if any(t not in self.special_ids for t in token_ids):
            raise MediaError("an image prompt must have no text: this model embeds text and images apart "
                             "(give the image with an empty prompt, and the text as a prompt of its own)")
        p = self.process("image", images[0])
        return [self.placeholder_id], [MultiModalItem("image", p.content_hash, PlaceholderRange(0, 1), p.data, p.meta)]

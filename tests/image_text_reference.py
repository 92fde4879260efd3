"""The transformers reference of the CLIP / SigLIP embedding tests: `get_text_features` / `get_image_features` of
the tiny checkpoint, in fp32, with its own tokenizer and image processor."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

MIN_COSINE = 0.9999


class ImageTextReference:
    def __init__(self, path: str | Path) -> None:
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.image_processor = AutoImageProcessor.from_pretrained(path)

    @torch.inference_mode()
    def text(self, text: str) -> torch.Tensor:  # [D]
        ids = torch.tensor([self.tokenizer(text).input_ids])
        return self.model.get_text_features(input_ids=ids).pooler_output[0]

    @torch.inference_mode()
    def image(self, image: Image.Image) -> torch.Tensor:  # [D]
        pixels = self.image_processor(images=image, return_tensors="pt")["pixel_values"]
        return self.model.get_image_features(pixel_values=pixels).pooler_output[0]


def assert_same_direction(got: torch.Tensor, want: torch.Tensor) -> None:
    """Cosine >= MIN_COSINE, row by row ([D] or [B, D])."""
    got, want = torch.as_tensor(got, dtype=torch.float32), want.float()
    assert got.shape == want.shape
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=-1).min().item()
    assert cosine >= MIN_COSINE, cosine

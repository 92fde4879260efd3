"""Pixels cross to the engine as uint8 and become the HF processors' float `pixel_values` on the engine's device:
bit-equal to the checkpoint's own image processor for every image family, at a quarter of the bytes."""

from __future__ import annotations

import functools

import pytest
import torch
from media_samples import noise_image
from transformers import AutoImageProcessor, AutoTokenizer, CLIPImageProcessorPil

from loomserve.modalities.config import MultiModalConfig
from loomserve.modalities.inputs import MultiModalItem, PlaceholderRange
from loomserve.modalities.pixels import PIXEL_TABLE, PIXELS, pixel_values, with_pixel_values
from loomserve.modalities.processors.llava import LlavaProcessor
from loomserve.platform.config import EngineArgs
from loomserve.platform.models.registry import create_processor
from loomserve.testing.clip_checkpoints import tiny_clip_checkpoint

IMAGES = [noise_image(30, 40, 0), noise_image(57, 23, 1, mode="L"), noise_image(90, 64, 2, mode="P")]


@functools.cache
def processor(path: str):
    model_config = EngineArgs(model=path).create_engine_config().model_config
    return create_processor(model_config, AutoTokenizer.from_pretrained(path), MultiModalConfig())


def on_device(item) -> torch.Tensor:
    return pixel_values(item.data[PIXELS], item.data[PIXEL_TABLE])


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("index", range(len(IMAGES)))
def test_embedding_model_pixels_equal_the_checkpoints_image_processor(family, index):
    path = str(tiny_clip_checkpoint(family))
    ours = processor(path).process_item("image", IMAGES[index])
    ref = AutoImageProcessor.from_pretrained(path)(images=IMAGES[index].convert("RGB"), return_tensors="pt")
    assert ours.data[PIXELS].dtype == torch.uint8
    assert torch.equal(on_device(ours), ref["pixel_values"][0])


def test_llava_pads_an_image_smaller_than_the_crop_before_normalizing_as_the_hf_processor(mm_checkpoint):
    path = mm_checkpoint("llava")
    model_config = EngineArgs(model=path).create_engine_config().model_config
    ours = LlavaProcessor(path, model_config.hf_config, AutoTokenizer.from_pretrained(path), MultiModalConfig())
    ours.shortest_edge = 20  # resized to 20 on its short side, then cropped to 28 x 28: zero-padded on uint8
    image = noise_image(33, 47, 3)
    ref = CLIPImageProcessorPil.from_pretrained(path, size={"shortest_edge": 20})(image, return_tensors="pt")
    assert torch.equal(on_device(ours.process_item("image", image)), ref["pixel_values"][0])


def test_qwen2_vl_items_carry_uint8_pixels_a_quarter_of_the_float_bytes(mm_checkpoint):
    item = processor(mm_checkpoint("qwen2_vl")).process_item("image", IMAGES[0])
    pixels, floats = item.data[PIXELS], on_device(item)
    assert pixels.dtype == torch.uint8 and "pixel_values" not in item.data
    assert pixels.nbytes * 4 == floats.nbytes
    assert floats.shape == (1, 3, *pixels.shape[1:3])  # [F, 3, H, W] from [F, H, W, 3]


def test_the_encoder_gets_a_float_copy_and_the_request_keeps_its_uint8_item(mm_checkpoint):
    p = processor(mm_checkpoint("qwen2_vl")).process_item("image", IMAGES[0])
    item = MultiModalItem("image", p.content_hash, PlaceholderRange(0, p.num_tokens), p.data, p.meta)
    encoded = with_pixel_values(item, torch.device("cpu"))
    assert set(encoded.data) == {"pixel_values", "grid_thw"}
    assert torch.equal(encoded.data["pixel_values"], on_device(item))
    assert set(item.data) == {PIXELS, PIXEL_TABLE, "grid_thw"}  # untouched: preemption re-encodes from it
    audio = MultiModalItem("audio", "h", PlaceholderRange(0, 1), {"input_features": torch.zeros(2, 3)})
    assert with_pixel_values(audio, torch.device("cpu")) is audio


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pixel_values_made_on_cuda_equal_the_hf_image_processor(mm_checkpoint):
    path = mm_checkpoint("llava")
    p = processor(path).process_item("image", IMAGES[2])
    item = MultiModalItem("image", p.content_hash, PlaceholderRange(0, p.num_tokens), p.data, p.meta)
    on_cuda = with_pixel_values(item, torch.device("cuda")).data["pixel_values"]
    ref = CLIPImageProcessorPil.from_pretrained(path)(IMAGES[2], return_tensors="pt")["pixel_values"][0]
    assert on_cuda.is_cuda and torch.equal(on_cuda.cpu(), ref)

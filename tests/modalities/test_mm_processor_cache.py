"""The front end's processor cache (`--mm-processor-cache-gb`): the same bytes are decoded and preprocessed once, a
hit costs the request's budget what a decode does, the content hash (the prefix-cache key) still follows the pixels,
and the cache keeps the most recently used items within its capacity."""

from __future__ import annotations

import base64
import io

import pytest
import torch
from media_samples import noise_image, png_data_url
from PIL import Image
from transformers import AutoTokenizer

from loomserve.modalities.budget import MediaBudget, MediaSpend
from loomserve.modalities.config import MultiModalConfig
from loomserve.modalities.frontend import MultiModalFrontend
from loomserve.modalities.media import MediaError, MediaRef
from loomserve.modalities.processor_cache import ProcessorCache
from loomserve.modalities.processors.base import ProcessedItem
from loomserve.platform.config import EngineArgs

IMAGE = noise_image(56, 56, 1)


def frontend(path: str, **config) -> MultiModalFrontend:
    model_config = EngineArgs(model=path).create_engine_config().model_config
    return MultiModalFrontend(model_config, AutoTokenizer.from_pretrained(path), MultiModalConfig(**config))


def bmp_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="BMP")
    return "data:image/bmp;base64," + base64.b64encode(buf.getvalue()).decode()


def item_of(nbytes: int) -> ProcessedItem:
    return ProcessedItem({"pixels": torch.zeros(nbytes, dtype=torch.uint8)}, 1, "h", {})


def test_the_same_bytes_are_decoded_and_preprocessed_once(mm_checkpoint):
    mm = frontend(mm_checkpoint("qwen2_vl"))
    ref = MediaRef("image", url=png_data_url(IMAGE))
    [first] = mm.load([ref])["image"]
    [again] = mm.load([ref])["image"]
    assert again is first
    assert (mm.cache.hits, mm.cache.misses) == (1, 1)


def test_other_bytes_of_the_same_pixels_are_another_entry_with_the_same_content_hash(mm_checkpoint):
    mm = frontend(mm_checkpoint("qwen2_vl"))
    [png] = mm.load([MediaRef("image", url=png_data_url(IMAGE))])["image"]
    [bmp] = mm.load([MediaRef("image", url=bmp_data_url(IMAGE))])["image"]
    assert bmp is not png and mm.cache.hits == 0
    assert bmp.content_hash == png.content_hash  # the prefix-cache key still follows the pixels
    assert torch.equal(bmp.data["pixels"], png.data["pixels"])


def test_a_hit_charges_the_request_budget_as_a_decode_does(mm_checkpoint):
    mm = frontend(mm_checkpoint("qwen2_vl"))
    ref = MediaRef("image", url=png_data_url(IMAGE))
    mm.load([ref])
    with pytest.raises(MediaError, match="pixels of images and video frames per request"):
        mm.load([ref, ref], MediaBudget(max_pixels=int(1.5 * 56 * 56)))  # both cached, still twice the pixels


def test_the_least_recently_used_items_leave_first_within_the_capacity():
    cache = ProcessorCache(capacity_bytes=300)
    for key in "abc":
        cache.put(key, item_of(100), {})
    cache.get("a", MediaSpend())  # now the most recently used
    cache.put("d", item_of(100), {})
    assert list(cache.entries) == ["c", "a", "d"] and cache.used == 300
    cache.put("huge", item_of(301), {})  # over the whole capacity: never kept, nothing evicted for it
    assert list(cache.entries) == ["c", "a", "d"]


def test_zero_gib_turns_the_cache_off_and_a_negative_size_is_refused(mm_checkpoint):
    path = mm_checkpoint("qwen2_vl")
    config = EngineArgs(model=path, mm_processor_cache_gb=0).create_engine_config().mm_config
    assert config.processor_cache_bytes == 0
    mm = frontend(path, processor_cache_bytes=0)
    ref = MediaRef("image", url=png_data_url(IMAGE))
    assert mm.load([ref])["image"][0] is not mm.load([ref])["image"][0]
    assert not mm.cache.entries
    with pytest.raises(ValueError, match="mm_processor_cache_gb must be at least 0"):
        EngineArgs(model=path, mm_processor_cache_gb=-1).create_engine_config()

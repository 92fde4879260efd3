"""Our preprocessing equals the HF processors' on the same inputs (Qwen2VLImageProcessorPil,
CLIPImageProcessorPil, WhisperFeatureExtractor), placeholders expand to the counts HF's processors use, and
content hashes tell items apart exactly when their encoder outputs can differ."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from media_samples import noise_image, noise_video, tone
from mm_reference import video_pixel_values
from PIL import Image
from transformers import (
    AutoConfig,
    AutoTokenizer,
    CLIPImageProcessorPil,
    LlavaProcessor,
    Qwen2AudioProcessor,
    Qwen2VLImageProcessorPil,
    WhisperFeatureExtractor,
)

from loomserve.modalities.config import MultiModalConfig
from loomserve.modalities.media import MediaError
from loomserve.modalities.pixels import PIXEL_TABLE, PIXELS, pixel_values
from loomserve.platform.config import EngineArgs
from loomserve.platform.models.qwen2_vl_vision import patchify
from loomserve.platform.models.registry import create_processor, is_multimodal


@functools.cache
def processor(path: str, **limits: int):
    model_config = EngineArgs(model=path).create_engine_config().model_config
    mm_config = MultiModalConfig(limit_per_prompt=limits)
    return create_processor(model_config, AutoTokenizer.from_pretrained(path), mm_config)


def device_pixel_values(item) -> torch.Tensor:
    """What the engine makes of the item's uint8 pixels before its vision tower."""
    return pixel_values(item.data[PIXELS], item.data[PIXEL_TABLE])


def transparent_image() -> Image.Image:
    rgba = np.random.RandomState(5).randint(0, 256, (61, 45, 4), dtype=np.uint8)
    return Image.fromarray(rgba, "RGBA")


IMAGES = {
    "rgb-square": noise_image(56, 56, 0),
    "rgb-odd": noise_image(33, 47, 1),
    "upscaled-below-min-pixels": noise_image(20, 30, 2),
    "downscaled-above-max-pixels": noise_image(300, 200, 3),
    "grayscale": noise_image(70, 100, 4, mode="L"),
    "palette": noise_image(90, 120, 6, mode="P"),
    "rgba-over-white": transparent_image(),
}


@pytest.mark.parametrize("name", IMAGES)
def test_qwen2_vl_images_equal_the_hf_image_processor(mm_checkpoint, name):
    path = mm_checkpoint("qwen2_vl")
    ours = processor(path).process_item("image", IMAGES[name])
    ref = Qwen2VLImageProcessorPil.from_pretrained(path)(IMAGES[name], return_tensors="pt")
    grid = ours.data["grid_thw"]
    assert grid.tolist() == ref["image_grid_thw"][0].tolist()
    assert ours.num_tokens == int(grid.prod()) // 4
    assert torch.equal(patchify(device_pixel_values(ours), 2, 14, 2), ref["pixel_values"])


def test_qwen2_vl_video_frames_equal_the_hf_pipeline_and_pad_to_the_temporal_patch(mm_checkpoint):
    path = mm_checkpoint("qwen2_vl")
    video = noise_video(3, 50, 70, seed=7)  # 3 frames: padded to 4 with the last one
    ours = processor(path).process_item("video", video)
    pixels, grids = video_pixel_values(path, [video])
    assert ours.data[PIXELS].shape[0] == 4
    assert ours.data["grid_thw"].tolist() == grids[0].tolist()
    assert torch.equal(patchify(device_pixel_values(ours), 2, 14, 2), pixels)
    assert ours.meta == {"second_per_grid": 1.0}  # 2 frames per temporal patch at the default 2 fps


@pytest.mark.parametrize("name", IMAGES)
def test_llava_images_equal_the_hf_clip_processor(mm_checkpoint, name):
    path = mm_checkpoint("llava")
    ours = processor(path).process_item("image", IMAGES[name])
    ref = CLIPImageProcessorPil.from_pretrained(path)(IMAGES[name], return_tensors="pt")["pixel_values"][0]
    assert torch.equal(device_pixel_values(ours), ref)


def test_llava_expands_image_tokens_like_the_hf_processor(mm_checkpoint):
    path = mm_checkpoint("llava")
    tok = AutoTokenizer.from_pretrained(path)
    hf = LlavaProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(path), tokenizer=tok, patch_size=14,
                        vision_feature_select_strategy="default", num_additional_image_tokens=1)
    text = "USER: <image>\nWhat? ASSISTANT:"
    expected = hf(text=text, images=[IMAGES["rgb-odd"]])["input_ids"][0]
    ids, [item] = processor(path).apply(tok.encode(text), {"image": [IMAGES["rgb-odd"]]})
    assert ids == expected
    first = expected.index(tok.convert_tokens_to_ids("<image>"))
    assert (item.placeholder.offset, item.placeholder.length) == (first, 16)


@pytest.mark.parametrize("seconds", [0.5, 1.37, 31.0])
def test_audio_features_equal_the_whisper_feature_extractor(mm_checkpoint, seconds):
    path = mm_checkpoint("qwen2_audio")
    clip = tone(seconds, seed=3)
    ours = processor(path).process_item("audio", (clip, 16000))
    fe = WhisperFeatureExtractor.from_pretrained(path)
    ref = fe(clip, sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="np")
    features = ours.data["input_features"].numpy()
    assert ours.meta["num_frames"] == ref["attention_mask"].sum() == min(int(np.ceil(seconds * 100)), 3000)
    np.testing.assert_allclose(features, ref["input_features"][0, :, : features.shape[1]], atol=1e-5)


def test_audio_expands_like_the_hf_processor_and_resamples_other_rates(mm_checkpoint):
    path = mm_checkpoint("qwen2_audio")
    tok = AutoTokenizer.from_pretrained(path)
    hf = Qwen2AudioProcessor(WhisperFeatureExtractor.from_pretrained(path), tok)
    text = "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nAudio 2: <|audio_bos|><|AUDIO|><|audio_eos|>\nWhich?"
    clips = [tone(0.9, seed=1), tone(1.7, seed=2)]
    expected = hf(text=text, audio=clips, sampling_rate=16000)["input_ids"][0]
    ids, items = processor(path).apply(tok.encode(text), {"audio": clips})
    assert ids == expected
    assert [i.placeholder.length for i in items] == [22, 42]

    import librosa

    at_22k = tone(1.0, seed=4, rate=22050)
    resampled = processor(path).process_item("audio", (at_22k, 22050))
    direct = processor(path).process_item("audio", (librosa.resample(at_22k, orig_sr=22050, target_sr=16000), 16000))
    assert torch.equal(resampled.data["input_features"], direct.data["input_features"])


def test_placeholder_counts_must_match_the_items(mm_checkpoint):
    path = mm_checkpoint("qwen2_vl")
    ids = AutoTokenizer.from_pretrained(path).encode("<|vision_start|><|image_pad|><|vision_end|> and text")
    with pytest.raises(MediaError, match=r"1 image placeholder\(s\) .* but 2 image item\(s\)"):
        processor(path).apply(ids, {"image": [IMAGES["rgb-square"]] * 2})
    with pytest.raises(MediaError, match="0 video placeholder"):
        processor(path).apply(ids, {"image": [IMAGES["rgb-square"]], "video": [noise_video(2, 28, 28, 0)]})


def test_limits_and_modalities_are_checked_before_processing(mm_checkpoint):
    qwen = processor(mm_checkpoint("qwen2_vl"), image=1)
    with pytest.raises(MediaError, match="at most 1 image item"):
        qwen.check_counts({"image": 2})
    with pytest.raises(MediaError, match="does not accept audio input"):
        qwen.check_counts({"audio": 1})
    with pytest.raises(MediaError, match="does not accept video input"):
        processor(mm_checkpoint("llava")).check_counts({"video": 1})


def test_content_hashes_follow_content_and_settings(mm_checkpoint):
    qwen = processor(mm_checkpoint("qwen2_vl"))
    image = IMAGES["rgb-odd"]
    same = qwen.process_item("image", np.asarray(image)).content_hash  # an array of the same pixels
    assert qwen.process_item("image", image).content_hash == same
    flipped = np.asarray(image).copy()
    flipped[0, 0, 0] ^= 1  # one bit of one pixel
    assert qwen.process_item("image", flipped).content_hash != same
    video = noise_video(4, 28, 28, seed=1)
    assert qwen.process_item("video", (video, {"fps": 2.0})).content_hash != qwen.process_item(
        "video", (video, {"fps": 4.0})).content_hash  # a video's frame rate moves its M-RoPE positions
    audio = processor(mm_checkpoint("qwen2_audio"))
    clips = [audio.process_item("audio", tone(0.5, seed)).content_hash for seed in (1, 2)]
    assert clips[0] != clips[1]


def test_architectures_without_a_processor_are_text_only(mm_checkpoint, qwen2_checkpoint):
    assert processor(qwen2_checkpoint) is None
    assert is_multimodal(AutoConfig.from_pretrained(mm_checkpoint("llava")).architectures[0])

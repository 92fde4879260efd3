"""The prompts the multimodal tests send, and the oracle: transformers' greedy continuation for a prompt with
media, built the way HF's own processors build model inputs (placeholders expanded, pixel values, grids,
token types, audio features)."""

from __future__ import annotations

import functools

import numpy as np
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoTokenizer,
    CLIPImageProcessorPil,
    Qwen2VLImageProcessorPil,
    WhisperFeatureExtractor,
)

MAX_TOKENS = 10


def image_prompt(family: str, n: int, question: str = "What is in it?") -> str:
    if family == "llava":
        return "USER: " + "<image>\n" * n + question + " ASSISTANT:"
    images = "<|vision_start|><|image_pad|><|vision_end|>" * n
    return f"<|im_start|>user\n{images}{question}<|im_end|>\n<|im_start|>assistant\n"


@functools.cache
def tokenizer(path: str):
    return AutoTokenizer.from_pretrained(path)


def ids_of(path: str, text: str) -> list[int]:
    return tokenizer(path).encode(text)


@functools.cache
def hf_model(path: str) -> torch.nn.Module:
    config = AutoConfig.from_pretrained(path)
    return getattr(transformers, config.architectures[0]).from_pretrained(path, dtype=torch.float32).eval()


def _expand(ids: list[int], token_id: int, counts: list[int]) -> list[int]:
    counts = iter(counts)
    out = []
    for t in ids:
        out.extend([t] * next(counts) if t == token_id else [t])
    return out


def video_pixel_values(path: str, videos: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """HF Qwen2-VL video inputs: each frame resized and normalized as the image processor does, frames padded
    to the temporal patch, patches laid out as `Qwen2VLVideoProcessor.patchify` (transcribed: that module needs
    torchvision)."""
    ip = Qwen2VLImageProcessorPil.from_pretrained(path)
    p, m, tp = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    pixels, grids = [], []
    for video in videos:
        frames = []
        for frame in video:
            chw = np.moveaxis(frame, -1, 0)
            chw = ip.resize(chw, ip.size, ip.resample, factor=p * m)
            frames.append(ip.normalize(ip.rescale(chw, ip.rescale_factor), ip.image_mean, ip.image_std))
        x = torch.from_numpy(np.stack(frames))[None]  # [1, F, C, H, W]
        if pad := -x.shape[1] % tp:
            x = torch.cat([x, x[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
        b, f, c, h, w = x.shape
        t, gh, gw = f // tp, h // p, w // p
        x = x.view(b, t, tp, c, gh // m, m, p, gw // m, m, p).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
        pixels.append(x.reshape(t * gh * gw, c * tp * p * p))
        grids.append([t, gh, gw])
    return torch.cat(pixels), torch.tensor(grids)


def qwen_vl_inputs(path: str, ids: list[int], images: list, videos: list[np.ndarray], fps: float) -> dict:
    config = AutoConfig.from_pretrained(path)
    kwargs: dict = {}
    if images:
        x = Qwen2VLImageProcessorPil.from_pretrained(path)(images, return_tensors="pt")
        kwargs.update(pixel_values=x["pixel_values"], image_grid_thw=x["image_grid_thw"])
        ids = _expand(ids, config.image_token_id, (x["image_grid_thw"].prod(-1) // 4).tolist())
    if videos:
        pixel_values, grids = video_pixel_values(path, videos)
        kwargs.update(pixel_values_videos=pixel_values, video_grid_thw=grids)
        if "2_5" in config.architectures[0]:
            kwargs["second_per_grid_ts"] = torch.tensor([2 / fps] * len(videos))
        ids = _expand(ids, config.video_token_id, (grids.prod(-1) // 4).tolist())
    input_ids = torch.tensor([ids])
    types = (input_ids == config.image_token_id).int() + 2 * (input_ids == config.video_token_id).int()
    return {"input_ids": input_ids, "mm_token_type_ids": types, **kwargs}


def llava_inputs(path: str, ids: list[int], images: list) -> dict:
    config = AutoConfig.from_pretrained(path)
    kwargs: dict = {}
    if images:
        kwargs["pixel_values"] = CLIPImageProcessorPil.from_pretrained(path)(images, return_tensors="pt")[
            "pixel_values"
        ]
        ids = _expand(ids, config.image_token_id, [16] * len(images))
    return {"input_ids": torch.tensor([ids]), **kwargs}


def audio_inputs(path: str, ids: list[int], audios: list[np.ndarray]) -> dict:
    config = AutoConfig.from_pretrained(path)
    kwargs: dict = {}
    if audios:
        fe = WhisperFeatureExtractor.from_pretrained(path)
        x = fe(audios, sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="pt")
        lengths = x["attention_mask"].sum(-1)
        counts = ((((lengths - 1) // 2 + 1) - 2) // 2 + 1).tolist()
        kwargs.update(input_features=x["input_features"], feature_attention_mask=x["attention_mask"])
        ids = _expand(ids, config.audio_token_index, counts)
    return {"input_ids": torch.tensor([ids]), **kwargs}


def hf_greedy(path: str, ids: list[int], images=(), videos=(), audios=(), fps: float = 2.0, model=None) -> list[int]:
    """transformers' MAX_TOKENS greedy tokens after `ids` (one placeholder token per item), from `model` (e.g. a
    peft model over it) or the checkpoint's own."""
    arch = AutoConfig.from_pretrained(path).architectures[0]
    if arch.startswith("Qwen2"):
        inputs = (audio_inputs(path, ids, list(audios)) if "Audio" in arch
                  else qwen_vl_inputs(path, ids, list(images), list(videos), fps))
    else:
        inputs = llava_inputs(path, ids, list(images))
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    with torch.no_grad():
        out = (hf_model(path) if model is None else model).generate(
            **inputs, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist()

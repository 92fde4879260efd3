"""Seeded tiny multimodal checkpoints in real Hugging Face format: LLaVA, Qwen2-VL, Qwen2.5-VL, Qwen2-Audio.

Each folder holds what the hub repository of the family holds: ``config.json`` (vision/audio and text
sub-configs), safetensors weights as transformers 5 saves them, ``generation_config.json``, a byte-level
BPE tokenizer with the family's special tokens and a chat template that renders image/video/audio parts,
and the processor configs (``preprocessor_config.json``, ``video_preprocessor_config.json``,
``processor_config.json``). Built once into the same cache as the text checkpoints
(`testing.cache.cached_build`), keyed by a SHA-256 of the arguments.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loomserve.modalities.processors.qwen2_vl import _CLIP_MEAN, _CLIP_STD
from loomserve.testing.cache import cached_build
from loomserve.testing.checkpoints import FORMAT_VERSION, INIT_STD, build_tokenizer
from loomserve.testing.weights import init_weights

MM_FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "qwen2_audio")

# Bump whenever the bytes a build writes change.
MM_FORMAT_VERSION = 3

QWEN_VL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
_QWEN_AUDIO_TOKENS = ["<|audio_bos|>", "<|audio_eos|>", "<|AUDIO|>"]

# ChatML whose content parts may be images and videos (as Qwen2-VL's own template renders them).
QWEN_VL_TEMPLATE = (
    "{%- for message in messages -%}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}\n"
    "{%- if message['content'] is string -%}{{- message['content'] -}}\n"
    "{%- else -%}{%- for part in message['content'] -%}\n"
    "{%- if part['type'] == 'image' or 'image' in part -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}\n"
    "{%- elif part['type'] == 'video' or 'video' in part -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}\n"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}\n"
    "{%- endif -%}{%- endfor -%}{%- endif -%}\n"
    "{{- '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}\n"
)

# Qwen2-Audio's template: every audio part becomes "Audio N: <|audio_bos|><|AUDIO|><|audio_eos|>\n".
_QWEN_AUDIO_TEMPLATE = (
    "{%- set audio_count = namespace(value=0) -%}\n"
    "{%- for message in messages -%}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}\n"
    "{%- if message['content'] is string -%}{{- message['content'] -}}\n"
    "{%- else -%}{%- for part in message['content'] -%}\n"
    "{%- if part['type'] == 'audio' or 'audio' in part -%}\n"
    "{%- set audio_count.value = audio_count.value + 1 -%}\n"
    "{{- 'Audio ' + audio_count.value|string + ': <|audio_bos|><|AUDIO|><|audio_eos|>\\n' -}}\n"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}\n"
    "{%- endif -%}{%- endfor -%}{%- endif -%}\n"
    "{{- '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}\n"
)

# LLaVA-1.5's template: "<s>USER: <image>\ntext ASSISTANT: answer</s>", images of a turn before its text.
_LLAVA_TEMPLATE = (
    "{{- bos_token -}}\n"
    "{%- for message in messages -%}\n"
    "{{- message['role'].upper() + ': ' -}}\n"
    "{%- if message['content'] is string -%}{{- message['content'] + ' ' -}}\n"
    "{%- else -%}\n"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{- '<image>\\n' -}}{%- endfor -%}\n"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{- part['text'] + ' ' -}}{%- endfor -%}\n"
    "{%- endif -%}\n"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}\n"
)


def build_mm_tokenizer(base_family: str, extra_tokens: list[str], chat_template: str, max_len: int) -> Any:
    """The text tokenizer of `base_family` with a multimodal family's special tokens and chat template."""
    tokenizer = build_tokenizer(base_family, model_max_length=max_len)
    tokenizer.add_special_tokens({"additional_special_tokens": extra_tokens}, replace_extra_special_tokens=False)
    tokenizer.chat_template = chat_template
    return tokenizer


def _text_config(model_type: str, tokenizer: Any, eos: str, max_len: int, **extra: Any) -> dict[str, Any]:
    ids = tokenizer.convert_tokens_to_ids
    return {
        "model_type": model_type,
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": max_len,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "initializer_range": INIT_STD,
        "tie_word_embeddings": False,
        "bos_token_id": ids(tokenizer.bos_token or tokenizer.pad_token),
        "eos_token_id": ids(eos),
        "pad_token_id": ids(tokenizer.pad_token),
        **extra,
    }


def _qwen_vl(tokenizer: Any, family: str, max_len: int) -> tuple[Any, dict[str, dict]]:
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    ids = tokenizer.convert_tokens_to_ids
    rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}
    text = _text_config(f"{family}_text", tokenizer, "<|im_end|>", max_len, rope_parameters=rope,
                        use_sliding_window=False, sliding_window=None)
    vision: dict[str, Any] = {"depth": 2, "num_heads": 2, "patch_size": 14, "spatial_merge_size": 2,
                              "temporal_patch_size": 2, "in_channels": 3, "initializer_range": INIT_STD}
    if family == "qwen2_vl":
        vision.update(embed_dim=32, hidden_size=64, mlp_ratio=2, hidden_act="quick_gelu")
        config_cls, arch = Qwen2VLConfig, "Qwen2VLForConditionalGeneration"
    else:
        # Windows of 56 px = 2x2 merged tokens; block 1 attends over the whole image, block 0 per window.
        vision.update(hidden_size=32, out_hidden_size=64, intermediate_size=48, hidden_act="silu",
                      window_size=56, fullatt_block_indexes=[1], tokens_per_second=2)
        config_cls, arch = Qwen2_5_VLConfig, "Qwen2_5_VLForConditionalGeneration"
    config = config_cls(
        text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"), architectures=[arch], tie_word_embeddings=False,
    )
    pixels = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}
    processor_class = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}[family]
    image = {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": processor_class,
             "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "image_mean": _CLIP_MEAN,
             "image_std": _CLIP_STD, "do_resize": True, "do_rescale": True, "do_normalize": True,
             "do_convert_rgb": True, "resample": 3, "rescale_factor": 1 / 255, **pixels}
    video = {**image, "video_processor_type": "Qwen2VLVideoProcessor", "fps": 2.0, "min_frames": 2, "max_frames": 8}
    del video["image_processor_type"]
    return config, {"preprocessor_config.json": image, "video_preprocessor_config.json": video}


def _llava(tokenizer: Any, max_len: int) -> tuple[Any, dict[str, dict]]:
    from transformers import LlavaConfig

    text = _text_config("llama", tokenizer, "</s>", max_len, head_dim=16, attention_bias=False, mlp_bias=False,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    vision = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
              "num_attention_heads": 2, "image_size": 56, "patch_size": 14, "projection_dim": 32,
              "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "initializer_range": INIT_STD}
    config = LlavaConfig(
        text_config=text, vision_config=vision, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=16, projector_hidden_act="gelu", vision_feature_select_strategy="default",
        vision_feature_layer=-2, architectures=["LlavaForConditionalGeneration"], tie_word_embeddings=False,
    )
    image = {"image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor",
             "size": {"shortest_edge": 56}, "crop_size": {"height": 56, "width": 56}, "do_resize": True,
             "do_center_crop": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
             "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD, "do_convert_rgb": True, "resample": 3}
    processor = {"processor_class": "LlavaProcessor", "patch_size": 14, "vision_feature_select_strategy": "default",
                 "num_additional_image_tokens": 1, "image_token": "<image>"}
    return config, {"preprocessor_config.json": image, "processor_config.json": processor}


def _qwen_audio(tokenizer: Any, max_len: int) -> tuple[Any, dict[str, dict]]:
    from transformers import Qwen2AudioConfig

    text = _text_config("qwen2", tokenizer, "<|im_end|>", max_len,
                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                        use_sliding_window=False, sliding_window=None)
    audio = {"model_type": "qwen2_audio_encoder", "d_model": 32, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
             "encoder_layers": 2, "num_mel_bins": 128, "max_source_positions": 1500, "activation_function": "gelu",
             "scale_embedding": False, "initializer_range": INIT_STD}
    config = Qwen2AudioConfig(text_config=text, audio_config=audio,
                              audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
                              architectures=["Qwen2AudioForConditionalGeneration"])
    features = {"feature_extractor_type": "WhisperFeatureExtractor", "processor_class": "Qwen2AudioProcessor",
                "feature_size": 128, "sampling_rate": 16000, "hop_length": 160, "chunk_length": 30, "n_fft": 400,
                "padding_value": 0.0, "padding_side": "right", "return_attention_mask": True, "dither": 0.0}
    return config, {"preprocessor_config.json": features}


def _model_class(family: str) -> Any:
    import transformers

    name = {"llava": "LlavaForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration",
            "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
            "qwen2_audio": "Qwen2AudioForConditionalGeneration"}[family]
    return getattr(transformers, name)


def build_tiny_mm_checkpoint(path: str | Path, family: str, *, seed: int = 0, max_len: int = 2048) -> Path:
    """Writes a tiny random checkpoint of `family` (one of MM_FAMILIES) with tokenizer and processor configs."""
    if family not in MM_FAMILIES:
        raise ValueError(f"unknown multimodal family {family!r}; expected one of {MM_FAMILIES}")
    import torch
    from transformers import GenerationConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if family == "llava":
        tokenizer = build_mm_tokenizer("llama", ["<image>"], _LLAVA_TEMPLATE, max_len)
        config, processor_files = _llava(tokenizer, max_len)
    elif family == "qwen2_audio":
        tokenizer = build_mm_tokenizer("qwen2", _QWEN_AUDIO_TOKENS, _QWEN_AUDIO_TEMPLATE, max_len)
        config, processor_files = _qwen_audio(tokenizer, max_len)
    else:
        tokenizer = build_mm_tokenizer("qwen2", QWEN_VL_TOKENS, QWEN_VL_TEMPLATE, max_len)
        config, processor_files = _qwen_vl(tokenizer, family, max_len)
    torch.manual_seed(seed)
    model = _model_class(family)(config).to(torch.float32)
    init_weights(model, seed, INIT_STD)
    text = config.get_text_config()
    model.generation_config = GenerationConfig(
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    for name, content in processor_files.items():
        (path / name).write_text(json.dumps(content, indent=2) + "\n")
    return path


def tiny_mm_checkpoint(family: str, **kwargs: Any) -> Path:
    """`build_tiny_mm_checkpoint`, built once into the cache (`testing.cache.cached_build`); returns the
    folder."""
    key = {"v": [FORMAT_VERSION, MM_FORMAT_VERSION], "family": family, "args": kwargs}
    return cached_build(family, key, lambda path: build_tiny_mm_checkpoint(path, family, **kwargs))

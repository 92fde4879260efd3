"""A seeded tiny Whisper checkpoint in real Hugging Face format: `WhisperForConditionalGeneration` weights, a
byte-level BPE tokenizer with Whisper's special tokens (start of transcript, languages, tasks, no timestamps),
`generation_config.json` with the maps `generate(language=..., task=...)` reads, and the feature extractor's
`preprocessor_config.json` (80 mel bins, 30 s). The encoder keeps Whisper's real 1500 positions; the rest is tiny,
with encoder and decoder of different depths, heads and widths (as in large-v3-turbo), so a mix-up shows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loomserve.testing.cache import cached_build
from loomserve.testing.checkpoints import FORMAT_VERSION, INIT_STD, build_tokenizer
from loomserve.testing.weights import init_weights

WHISPER_FORMAT_VERSION = 2
LANGUAGES = ("en", "de", "fr", "es", "ja", "zh")
TASKS = ("transcribe", "translate")
_SPECIAL = ["<|startoftranscript|>", *(f"<|{code}|>" for code in LANGUAGES), "<|translate|>", "<|transcribe|>",
            "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]


def _tokenizer(max_len: int) -> Any:
    tokenizer = build_tokenizer("qwen2", model_max_length=max_len)  # ends with <|endoftext|>, Whisper's end too
    tokenizer.add_special_tokens({"additional_special_tokens": _SPECIAL}, replace_extra_special_tokens=False)
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.chat_template = None
    return tokenizer


def build_tiny_whisper_checkpoint(path: str | Path, *, seed: int = 0, max_target_positions: int = 448) -> Path:
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(max_target_positions)
    ids = tokenizer.convert_tokens_to_ids
    eos = ids("<|endoftext|>")
    config = WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=80, d_model=32, encoder_layers=2, decoder_layers=3,
        encoder_attention_heads=4, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=48,
        max_source_positions=1500, max_target_positions=max_target_positions, activation_function="gelu",
        decoder_start_token_id=ids("<|startoftranscript|>"), bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        suppress_tokens=None, begin_suppress_tokens=None, tie_word_embeddings=True,
        architectures=["WhisperForConditionalGeneration"], initializer_range=INIT_STD,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).to(torch.float32)
    init_weights(model, seed, INIT_STD)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        is_multilingual=True, lang_to_id={f"<|{c}|>": ids(f"<|{c}|>") for c in LANGUAGES},
        task_to_id={t: ids(f"<|{t}|>") for t in TASKS}, no_timestamps_token_id=ids("<|notimestamps|>"),
        max_length=max_target_positions,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    features = {"feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 80, "sampling_rate": 16000,
                "hop_length": 160, "chunk_length": 30, "n_fft": 400, "n_samples": 480000, "nb_max_frames": 3000,
                "padding_value": 0.0, "padding_side": "right", "return_attention_mask": False, "dither": 0.0,
                "processor_class": "WhisperProcessor"}
    (path / "preprocessor_config.json").write_text(json.dumps(features, indent=2) + "\n")
    return path


def tiny_whisper_checkpoint(**kwargs: Any) -> Path:
    """`build_tiny_whisper_checkpoint`, built once into the cache (`testing.cache.cached_build`)."""
    key = {"v": [FORMAT_VERSION, WHISPER_FORMAT_VERSION], "args": kwargs}
    return cached_build("whisper", key, lambda path: build_tiny_whisper_checkpoint(path, **kwargs))

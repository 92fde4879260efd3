"""ModelConfig: the checkpoint and the numbers read off its config.json; which device and dtype run it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str) -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N` -> the device, refused when it is not on this machine."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; choose auto, cpu, cuda or cuda:N") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; choose auto, cpu, cuda or cuda:N")
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r}: no CUDA GPU is visible here; use --device cpu (or auto)")
        if (resolved.index or 0) >= count:
            raise ValueError(f"device {device!r}: only {count} CUDA GPU(s) are visible (cuda:0 to cuda:{count - 1})")
    return resolved


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """`auto` is float32 on CPU (no fast bf16 there) and bfloat16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def context_limit(text_config: Any) -> int:
    """The longest context the checkpoint serves with the attention implemented here."""
    # Whisper's decoder names its learned positions max_target_positions
    limit = (getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "max_target_positions", None)
             or 2048)
    window = getattr(text_config, "sliding_window", None)
    # Sliding-window attention is not implemented: serve only contexts inside the window, where
    # full attention computes the same function.
    uses_window = getattr(text_config, "use_sliding_window", True)
    if window and uses_window:
        limit = min(limit, window)
    return limit


def parse_model_len(value: int | str | None) -> int | None:
    """vLLM's forms of a context length: 8192, '8k' (8,000), '8K' (8,192), '1m', '1M'; None, 'auto' or -1: the
    model's."""
    if value is None or isinstance(value, int):
        return None if value == -1 else value
    text = value.strip()
    if text in ("auto", "-1"):
        return None
    units = {"k": 10**3, "K": 2**10, "m": 10**6, "M": 2**20, "g": 10**9, "G": 2**30}
    scale = units.get(text[-1:], 1)
    number = text[:-1] if scale != 1 else text
    try:
        length = int(float(number) * scale)
    except ValueError:
        raise ValueError(f"cannot read a context length from {value!r} (e.g. 8192, 8k or 8K)") from None
    if length < 1:
        raise ValueError(f"max_model_len must be positive, got {value!r}")
    return length


def default_served_name(model: str) -> str:
    return model if not os.path.isdir(model) else model.rstrip("/")


@dataclass
class ModelConfig:
    """The checkpoint and the numbers read off its config.json."""

    model: str
    tokenizer: str
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    load_format: str
    seed: int
    hf_config: Any = field(repr=False)
    served_model_name: str
    quantization: str | None = None  # platform/quantization/methods.py: how the linear weights are stored
    gguf_file: str | None = None  # weights, config and tokenizer come from this file of the `model` folder
    task: str = "generate"  # generate | embed | classify: which routes and LLM methods serve it
    encoder_only: bool = False  # bidirectional attention: no KV cache, whole prompts in one step
    pooler_config: Any = None  # loomserve.pooling.config.PoolerConfig: how hidden states become vectors
    served_model_aliases: tuple[str, ...] = ()  # more names clients may send (--served-model-name a b)
    trust_remote_code: bool = False  # transformers may run the checkpoint's code for its config and tokenizer
    max_logprobs: int = 20  # most logprobs one request may ask for
    enable_prompt_embeds: bool = False  # requests may bring embeddings in place of token ids (prompt_embeds)
    enable_mm_embeds: bool = False  # media items may come as their encoder's output (image_embeds, audio_embeds)
    skip_tokenizer_init: bool = False  # no tokenizer: token ids in, token ids out

    @property
    def architecture(self) -> str:
        return (getattr(self.hf_config, "architectures", None) or ["?"])[0]

    @property
    def text_config(self) -> Any:
        return self.hf_config.get_text_config()

    # A flat encoder-decoder config (Whisper) maps the generic names to its encoder's: the KV cache is the decoder's.
    @property
    def num_layers(self) -> int:
        c = self.text_config
        return getattr(c, "decoder_layers", None) or c.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        c = self.text_config
        return (getattr(c, "decoder_attention_heads", None) or getattr(c, "num_key_value_heads", None)
                or c.num_attention_heads)

    @property
    def head_dim(self) -> int:
        c = self.text_config
        heads = getattr(c, "decoder_attention_heads", None) or c.num_attention_heads
        return getattr(c, "head_dim", None) or c.hidden_size // heads

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

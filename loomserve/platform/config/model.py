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
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
    limit = getattr(text_config, "max_position_embeddings", None) or 2048
    window = getattr(text_config, "sliding_window", None)
    # Sliding-window attention is not implemented: serve only contexts inside the window, where
    # full attention computes the same function.
    uses_window = getattr(text_config, "use_sliding_window", True)
    if window and uses_window:
        limit = min(limit, window)
    return limit


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
    quantization: str | None = None  # "bitsandbytes": NF4 linear weights
    task: str = "generate"  # generate | embed | classify: which routes and LLM methods serve it
    encoder_only: bool = False  # bidirectional attention: no KV cache, whole prompts in one step
    pooler_config: Any = None  # loomserve.pooling.config.PoolerConfig: how hidden states become vectors

    @property
    def architecture(self) -> str:
        return (getattr(self.hf_config, "architectures", None) or ["?"])[0]

    @property
    def text_config(self) -> Any:
        return self.hf_config.get_text_config()

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        c = self.text_config
        return getattr(c, "num_key_value_heads", None) or c.num_attention_heads

    @property
    def head_dim(self) -> int:
        c = self.text_config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

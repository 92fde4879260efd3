"""EngineConfig and its sub-configs: which model, how the KV cache is sized, how steps are scheduled."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from loomserve.modalities.config import MultiModalConfig, build_mm_config
from loomserve.platform.attention import resolve_attention_backend

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


def parse_memory(value: int | float | str | None) -> int | None:
    """'4GiB', '512MiB', '2e9', 1073741824 -> bytes."""
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?i?B?)?\s*", value)
    if not m:
        raise ValueError(f"cannot read a memory size from {value!r} (try 4GiB or 512MiB)")
    units = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "KIB": 2**10, "M": 1e6, "MB": 1e6, "MIB": 2**20,
             "G": 1e9, "GB": 1e9, "GIB": 2**30, "T": 1e12, "TB": 1e12, "TIB": 2**40}
    return int(float(m.group(1)) * units[(m.group(2) or "").upper()])


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


@dataclass
class CacheConfig:
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; wins over gpu_memory_utilization
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    num_blocks: int = 0  # set once the runner has measured memory


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    enable_chunked_prefill: bool = True  # off for encoder-only models: their prompts must run whole


@dataclass
class LoRAConfig:
    max_loras: int = 1  # adapters in one step (device slots)
    max_lora_rank: int = 16
    max_cpu_loras: int = 1  # adapters kept in host memory, least recently used evicted first

    def __post_init__(self) -> None:
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise ValueError(f"max_loras and max_lora_rank must be at least 1, got {self.max_loras}, "
                             f"{self.max_lora_rank}")
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras ({self.max_loras})")


@dataclass
class EngineConfig:
    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    attention_backend: str = "torch"
    enforce_eager: bool = False  # no CUDA graphs
    max_cudagraph_capture_size: int = 512  # largest step (tokens) a mixed prefill/decode graph holds; 0: decode only
    async_scheduling: bool = False  # schedule step N+1 while the device runs step N
    lora_config: LoRAConfig | None = None  # None: LoRA off
    mm_config: MultiModalConfig = field(default_factory=MultiModalConfig)


@dataclass
class EngineArgs:
    """The flat, user-facing knobs (CLI flags and `LLM(...)` keywords), vLLM's names."""

    model: str
    tokenizer: str | None = None
    served_model_name: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    load_format: str = "auto"
    seed: int = 0
    block_size: int = 16
    kv_cache_memory: int | str | None = None
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    max_num_batched_tokens: int | None = None
    max_num_seqs: int = 256
    attention_backend: str = "auto"
    enforce_eager: bool = False
    max_cudagraph_capture_size: int = 512
    async_scheduling: bool | None = None  # None: on for CUDA, off for CPU (where nothing runs asynchronously)
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # default: max_loras
    quantization: str | None = None  # "bitsandbytes" (NF4); a 4-bit checkpoint sets it itself
    task: str = "auto"  # auto (from the checkpoint), generate, embed or classify
    pooler_config: str | dict | None = None  # JSON overrides of the checkpoint's pooling defaults
    limit_mm_per_prompt: dict[str, int] | str | None = None  # e.g. {"image": 4, "video": 1, "audio": 2}
    allowed_media_domains: list[str] | None = None
    allowed_local_media_path: str | None = None
    max_image_pixels: int = 89_478_485
    encoder_cache_memory: int | str = "256MiB"
    media_io_kwargs: dict[str, dict[str, Any]] | str | None = None  # e.g. {"video": {"num_frames": 8}}

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def create_engine_config(self) -> EngineConfig:
        from transformers import AutoConfig

        from loomserve.platform.quantization import check_quantization
        from loomserve.pooling.config import resolve_pooling

        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise ValueError(f"unknown load_format {self.load_format!r}; choose auto, safetensors or dummy")
        hf_config = AutoConfig.from_pretrained(self.model)
        text = hf_config.get_text_config()
        device = resolve_device(self.device)
        limit = _context_limit(text)
        pooling = resolve_pooling(self.model, hf_config, self.task, self.pooler_config)
        limit = min(limit, pooling.max_model_len or limit)
        max_model_len = self.max_model_len or limit
        if max_model_len > limit:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's context of {limit} tokens")
        model_config = ModelConfig(
            model=self.model,
            tokenizer=self.tokenizer or self.model,
            dtype=resolve_dtype(self.dtype, device),
            device=device,
            max_model_len=max_model_len,
            load_format=self.load_format,
            seed=self.seed,
            hf_config=hf_config,
            served_model_name=self.served_model_name or _default_name(self.model),
            quantization=check_quantization(self.quantization, hf_config),
            task=pooling.task,
            encoder_only=pooling.encoder_only,
            pooler_config=pooling.pooler_config,
        )
        cache_config = CacheConfig(
            block_size=self.block_size,
            kv_cache_memory=parse_memory(self.kv_cache_memory),
            gpu_memory_utilization=self.gpu_memory_utilization,
            num_gpu_blocks_override=self.num_gpu_blocks_override,
            enable_prefix_caching=self.enable_prefix_caching and not pooling.encoder_only,
        )
        budget = self.max_num_batched_tokens or _default_token_budget(device, max_model_len, pooling.encoder_only)
        scheduler_config = SchedulerConfig(
            max_num_batched_tokens=budget,
            max_num_seqs=self.max_num_seqs,
            enable_chunked_prefill=not pooling.encoder_only,
        )
        lora_config = None
        if self.enable_lora:
            lora_config = LoRAConfig(self.max_loras, self.max_lora_rank, self.max_cpu_loras or self.max_loras)
        backend = resolve_attention_backend(self.attention_backend, device)
        async_scheduling = device.type == "cuda" if self.async_scheduling is None else self.async_scheduling
        mm_config = build_mm_config(
            self.limit_mm_per_prompt, self.allowed_media_domains, self.allowed_local_media_path,
            self.max_image_pixels, parse_memory(self.encoder_cache_memory), self.media_io_kwargs,
        )
        if self.max_cudagraph_capture_size < 0:
            raise ValueError(f"max_cudagraph_capture_size must be at least 0, got {self.max_cudagraph_capture_size}")
        return EngineConfig(
            model_config, cache_config, scheduler_config, backend, self.enforce_eager,
            min(self.max_cudagraph_capture_size, budget), async_scheduling, lora_config, mm_config,
        )


def _default_token_budget(device: torch.device, max_model_len: int, encoder_only: bool) -> int:
    """Bigger steps keep a GPU's matmuls efficient; a CPU keeps them short so decodes are not starved. Encoders (no
    KV cache, no decodes) run every prompt whole, so a step holds at least one whole context; on CPU they pack 4096
    tokens, where their matmuls run most efficiently (measured for all-MiniLM-L6-v2)."""
    if device.type == "cuda":
        return max(8192, max_model_len) if encoder_only else 8192
    return max(4096, max_model_len) if encoder_only else max(2048, min(max_model_len, 8192))


def _context_limit(text_config: Any) -> int:
    limit = getattr(text_config, "max_position_embeddings", None) or 2048
    window = getattr(text_config, "sliding_window", None)
    # Sliding-window attention is not implemented: serve only contexts inside the window, where
    # full attention computes the same function.
    uses_window = getattr(text_config, "use_sliding_window", True)
    if window and uses_window:
        limit = min(limit, window)
    return limit


def _default_name(model: str) -> str:
    return model if not os.path.isdir(model) else model.rstrip("/")


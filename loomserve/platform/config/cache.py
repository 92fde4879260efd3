"""CacheConfig: how the paged KV cache is sized and shared; memory sizes as users write them."""

from __future__ import annotations

import re
from dataclasses import dataclass


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


# vLLM's names: auto is the model's dtype; fp8 (= fp8_e4m3) and fp8_e5m2 store float8 keys and values, scaled per layer
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")


@dataclass
class CacheConfig:
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; wins over gpu_memory_utilization
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    cache_dtype: str = "auto"
    calculate_kv_scales: bool = False  # fp8 caches: scales from the first step's keys and values, not 1.0

    def __post_init__(self) -> None:
        # Block tables index tokens by shifts and the Triton kernels tile by powers of two.
        if not (1 <= self.block_size <= 256 and self.block_size & (self.block_size - 1) == 0):
            raise ValueError(f"block_size must be a power of two from 1 to 256 (e.g. 16), got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        if self.cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"unknown kv_cache_dtype {self.cache_dtype!r}; choose one of: "
                             f"{', '.join(KV_CACHE_DTYPES)}")
        if self.calculate_kv_scales and self.cache_dtype == "auto":
            raise ValueError("calculate_kv_scales sets the scales of an fp8 KV cache: pass --kv-cache-dtype fp8 too")

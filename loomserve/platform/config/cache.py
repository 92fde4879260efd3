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


@dataclass
class CacheConfig:
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; wins over gpu_memory_utilization
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    num_blocks: int = 0  # set once the runner has measured memory

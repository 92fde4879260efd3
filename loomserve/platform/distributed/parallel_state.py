"""The tensor-parallel group this process belongs to, set once per process before the model is built.

Layers read it when they are constructed (how big their shard is, which rows they load) and keep it for their
collectives: the group is fixed for a process's life, unlike the per-step state that rides in `ForwardBatch`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed ProcessGroup of the ranks; None for a group of one
    expert_parallel: bool = False  # MoE experts are split across the ranks instead of sliced on each


_SINGLE = TPGroup()
_tp_group = _SINGLE


def get_tp_group() -> TPGroup:
    return _tp_group


def init_tensor_parallel(
    rank: int, size: int, init_method: str, device: torch.device, expert_parallel: bool = False
) -> TPGroup:
    """Join the `size` ranks rendezvousing at `init_method` (tcp://host:port): NCCL on CUDA, gloo on CPU. A process
    already in the group keeps it and only changes how experts are split."""
    global _tp_group
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size)
    _tp_group = TPGroup(rank, size, dist.group.WORLD, expert_parallel)
    return _tp_group


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size {denominator}")
    return numerator // denominator


def kv_heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    """KV heads each rank holds: a slice of them, or one (replicated) when there are more ranks than heads."""
    if num_kv_heads >= tp_size:
        return divide(num_kv_heads, tp_size, "num_key_value_heads")
    if tp_size % num_kv_heads:
        raise ValueError(f"the tensor-parallel size {tp_size} is neither a divisor nor a multiple of "
                         f"num_key_value_heads ({num_kv_heads})")
    return 1


def check_tensor_parallel(text_config: Any, tp_size: int) -> None:
    """Refuse a model whose attention heads cannot be split across `tp_size` ranks, before any weight loads."""
    if tp_size == 1:
        return
    num_heads = text_config.num_attention_heads
    divide(num_heads, tp_size, "num_attention_heads")
    kv_heads_per_rank(getattr(text_config, "num_key_value_heads", None) or num_heads, tp_size)

"""ParallelConfig: how the model is split across devices and processes (vLLM's names).

Only one device in one process is implemented: any size other than 1 is refused with a clear error rather than
silently served on one device."""

from __future__ import annotations

from dataclasses import dataclass

EXECUTOR_BACKENDS = ("mp",)


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None  # "mp": one process per rank; None: chosen from the sizes
    enable_expert_parallel: bool = False  # MoE experts split across the tensor-parallel ranks instead of sliced

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "data_parallel_size", "pipeline_parallel_size"):
            size = getattr(self, name)
            if size < 1:
                raise ValueError(f"{name} must be at least 1, got {size}")
            if size != 1:
                raise ValueError(f"{name}={size} is not supported yet: loomserve runs on one device (size 1)")
        backend = self.distributed_executor_backend
        if backend is not None and backend not in EXECUTOR_BACKENDS:
            raise ValueError(f"unknown distributed_executor_backend {backend!r}; choose {', '.join(EXECUTOR_BACKENDS)}")

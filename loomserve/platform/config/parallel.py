"""ParallelConfig: how the model is split across devices and processes (vLLM's names).

Data parallelism runs N EngineCore processes, each a whole replica, behind the server's front end, which routes
each request to one of them. Tensor parallelism runs one process per rank under the multi-process executor
(torch.distributed: gloo on CPU, NCCL on CUDA), with the experts of MoE models sliced or, with
`enable_expert_parallel`, split across the same ranks. The ranks may be Ray actors (`distributed_executor_backend
"ray"`) or span `nnodes` hosts, node 0 running the engine. Pipeline parallelism is not implemented and is refused
rather than silently served on one device."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from loomserve.platform.distributed.parallel_state import check_tensor_parallel, divide
from loomserve.platform.dp_router import ROUTINGS

EXECUTOR_BACKENDS = ("mp", "ray")


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None  # "mp": one process per rank; None: chosen from the sizes
    enable_expert_parallel: bool = False  # MoE experts split across the tensor-parallel ranks instead of sliced
    data_parallel_routing: str = "cache_aware"  # how the front end picks an engine replica (`dp_router.py`)
    nnodes: int = 1  # hosts the tensor-parallel ranks span (mp backend): node 0 runs the engine, the others only ranks
    node_rank: int = 0
    master_addr: str = "127.0.0.1"  # node 0's address: the ranks' rendezvous (master_port) and steps (master_port + 1)
    master_port: int = 29501

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "data_parallel_size", "pipeline_parallel_size"):
            size = getattr(self, name)
            if size < 1:
                raise ValueError(f"{name} must be at least 1, got {size}")
        if self.data_parallel_routing not in ROUTINGS:
            raise ValueError(f"unknown data_parallel_routing {self.data_parallel_routing!r}; choose "
                             f"{', '.join(ROUTINGS)}")
        if self.pipeline_parallel_size != 1:
            raise ValueError(f"pipeline_parallel_size={self.pipeline_parallel_size} is not supported yet: use "
                             "tensor_parallel_size to split a model across devices")
        backend = self.distributed_executor_backend
        if backend is not None and backend not in EXECUTOR_BACKENDS:
            raise ValueError(f"unknown distributed_executor_backend {backend!r}; choose {', '.join(EXECUTOR_BACKENDS)}")
        if backend == "ray" and importlib.util.find_spec("ray") is None:
            raise ValueError("distributed_executor_backend 'ray' needs Ray: pip install 'loomserve[ray]'")
        if backend is None and self.tensor_parallel_size > 1:
            self.distributed_executor_backend = "mp"  # one process per rank
        self._check_nodes()

    def _check_nodes(self) -> None:
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, nnodes); got node_rank {self.node_rank}, nnodes {self.nnodes}")
        if self.nnodes == 1:
            return
        if self.distributed_executor_backend != "mp":
            raise ValueError("nnodes > 1 runs the ranks with the mp backend; a Ray cluster places them itself: use "
                             "distributed_executor_backend 'ray' with nnodes 1")
        if self.tensor_parallel_size % self.nnodes:
            raise ValueError(f"tensor_parallel_size ({self.tensor_parallel_size}) must be a multiple of nnodes "
                             f"({self.nnodes}): every node runs as many ranks")

    def check_model(self, text_config: Any, model_cls: type) -> None:
        """Refuse, before any weight loads, a model these sizes cannot split."""
        tp = self.tensor_parallel_size
        if tp == 1:
            return
        check_tensor_parallel(text_config, tp)
        if model_cls.is_multimodal or model_cls.pooling_tasks:
            raise ValueError("tensor parallelism serves text generation models only; serve this model with "
                             "tensor_parallel_size 1")
        if self.enable_expert_parallel and model_cls.is_moe:
            divide(_num_experts(text_config), tp, "the number of experts")


def _num_experts(text_config: Any) -> int:
    return getattr(text_config, "num_experts", None) or text_config.num_local_experts

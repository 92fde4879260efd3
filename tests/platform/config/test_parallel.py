"""Parallel sizes use vLLM's names; what is not implemented (pipeline stages, data parallelism inside one `LLM`) is
refused, not silently ignored, tensor parallelism picks the multi-process executor, and ranks spread over nodes
evenly."""

from __future__ import annotations

import pytest

from loomserve import LLM
from loomserve.platform.config import EngineArgs, ParallelConfig


def test_the_default_is_one_device_in_one_process(qwen2_checkpoint):
    config = EngineArgs(qwen2_checkpoint, device="cpu").create_engine_config()
    assert config.parallel_config == ParallelConfig()
    assert (config.parallel_config.tensor_parallel_size, config.parallel_config.data_parallel_size,
            config.parallel_config.pipeline_parallel_size) == (1, 1, 1)
    assert config.parallel_config.distributed_executor_backend is None


def test_tensor_parallel_runs_one_process_per_rank(qwen2_checkpoint):
    config = EngineArgs(qwen2_checkpoint, device="cpu", tensor_parallel_size=2).create_engine_config()
    assert config.parallel_config.distributed_executor_backend == "mp"


def test_pipeline_stages_are_not_supported_yet(qwen2_checkpoint):
    with pytest.raises(ValueError, match="pipeline_parallel_size=2 is not supported yet"):
        EngineArgs(qwen2_checkpoint, device="cpu", pipeline_parallel_size=2).create_engine_config()


def test_llm_refuses_data_parallel_replicas(qwen2_checkpoint):
    with pytest.raises(ValueError, match="serve data_parallel_size > 1 with `loomserve serve`"):
        LLM(qwen2_checkpoint, device="cpu", data_parallel_size=2)


def test_sizes_below_one_are_rejected():
    with pytest.raises(ValueError, match="tensor_parallel_size must be at least 1"):
        ParallelConfig(tensor_parallel_size=0)


def test_the_executor_backend_is_mp_ray_or_unset():
    assert ParallelConfig(distributed_executor_backend="mp", enable_expert_parallel=True).enable_expert_parallel
    assert ParallelConfig(distributed_executor_backend="ray").distributed_executor_backend == "ray"
    with pytest.raises(ValueError, match="unknown distributed_executor_backend 'slurm'; choose mp, ray"):
        ParallelConfig(distributed_executor_backend="slurm")


def test_ranks_spread_evenly_over_the_nodes():
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(3\) must be a multiple of nnodes \(2\)"):
        ParallelConfig(tensor_parallel_size=3, nnodes=2)
    with pytest.raises(ValueError, match=r"node_rank must be in \[0, nnodes\)"):
        ParallelConfig(tensor_parallel_size=2, nnodes=2, node_rank=2)


def test_several_nodes_run_the_mp_backend_not_ray():
    with pytest.raises(ValueError, match="nnodes > 1 runs the ranks with the mp backend"):
        ParallelConfig(tensor_parallel_size=2, nnodes=2, distributed_executor_backend="ray")

"""Parallel sizes use vLLM's names; anything but one device in one process is refused, not silently ignored."""

from __future__ import annotations

import pytest

from loomserve.platform.config import EngineArgs, ParallelConfig


def test_the_default_is_one_device_in_one_process(qwen2_checkpoint):
    config = EngineArgs(qwen2_checkpoint, device="cpu").create_engine_config()
    assert config.parallel_config == ParallelConfig()
    assert (config.parallel_config.tensor_parallel_size, config.parallel_config.data_parallel_size,
            config.parallel_config.pipeline_parallel_size) == (1, 1, 1)


@pytest.mark.parametrize("name", ["tensor_parallel_size", "data_parallel_size", "pipeline_parallel_size"])
def test_sizes_above_one_are_not_supported_yet(qwen2_checkpoint, name):
    with pytest.raises(ValueError, match=f"{name}=2 is not supported yet"):
        EngineArgs(qwen2_checkpoint, device="cpu", **{name: 2}).create_engine_config()


def test_sizes_below_one_are_rejected():
    with pytest.raises(ValueError, match="tensor_parallel_size must be at least 1"):
        ParallelConfig(tensor_parallel_size=0)


def test_the_executor_backend_is_mp_or_unset():
    assert ParallelConfig(distributed_executor_backend="mp", enable_expert_parallel=True).enable_expert_parallel
    with pytest.raises(ValueError, match="distributed_executor_backend 'ray'"):
        ParallelConfig(distributed_executor_backend="ray")

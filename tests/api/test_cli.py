"""`loomserve serve` flags reach the engine under vLLM's names and meanings."""

from __future__ import annotations

import pytest

from loomserve.api.cli import engine_args_from, make_parser
from loomserve.platform.config import EngineArgs


def parse(*flags: str) -> EngineArgs:
    return engine_args_from(make_parser().parse_args(["serve", "some/model", *flags]))


def test_cuda_graph_flags_reach_the_engine_args():
    args = parse("--enforce-eager", "--max-cudagraph-capture-size", "256", "--no-async-scheduling")
    assert (args.enforce_eager, args.max_cudagraph_capture_size, args.async_scheduling) == (True, 256, False)


def test_cuda_graph_defaults_match_the_engine_args_defaults():
    args = parse()
    assert args.max_cudagraph_capture_size == EngineArgs("m").max_cudagraph_capture_size == 512
    assert not args.enforce_eager and args.async_scheduling is None


def test_mixed_graphs_hold_no_step_larger_than_the_token_budget(qwen2_checkpoint):
    config = EngineArgs(qwen2_checkpoint, device="cpu", max_num_batched_tokens=128).create_engine_config()
    assert config.max_cudagraph_capture_size == 128


def test_negative_capture_size_is_rejected(qwen2_checkpoint):
    with pytest.raises(ValueError, match="max_cudagraph_capture_size"):
        EngineArgs(qwen2_checkpoint, device="cpu", max_cudagraph_capture_size=-1).create_engine_config()

"""`loomserve serve` flags reach the engine under vLLM's names and meanings."""

from __future__ import annotations

import dataclasses

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


def test_every_engine_arg_has_a_flag_with_help():
    serve = make_parser()._subparsers._group_actions[0].choices["serve"]
    actions = {action.dest: action for action in serve._actions}
    for f in dataclasses.fields(EngineArgs):
        assert f.name in actions, f"EngineArgs.{f.name} has no `loomserve serve` flag"
        assert actions[f.name].help, f"the flag of EngineArgs.{f.name} has no help"
        expected_default = None if f.default is dataclasses.MISSING else f.default
        assert actions[f.name].default == expected_default, f.name


def test_flags_read_each_field_type():
    args = parse("--no-enable-prefix-caching", "--max-num-seqs", "8", "--gpu-memory-utilization", "0.5",
                 "--kv-cache-memory", "4GiB", "--allowed-media-domains", "a.org", "b.org",
                 "--tensor-parallel-size", "2",
                 "--distributed-executor-backend", "mp", "--speculative-config", '{"method": "ngram"}')
    assert (args.enable_prefix_caching, args.max_num_seqs, args.gpu_memory_utilization) == (False, 8, 0.5)
    assert (args.kv_cache_memory, args.allowed_media_domains) == ("4GiB", ["a.org", "b.org"])
    assert (args.tensor_parallel_size, args.distributed_executor_backend) == (2, "mp")
    assert args.speculative_config == '{"method": "ngram"}'


def test_choices_come_from_the_fields():
    with pytest.raises(SystemExit):
        parse("--task", "translate")


def test_every_serve_flag_has_help_text():
    serve = make_parser()._subparsers._group_actions[0].choices["serve"]
    missing = [action.dest for action in serve._actions if not action.help]
    assert not missing, f"flags without help: {missing}"


def test_vllm_short_parallel_flags_name_the_long_ones():
    args = parse("-tp", "2", "-dp", "3")
    assert (args.tensor_parallel_size, args.data_parallel_size) == (2, 3)

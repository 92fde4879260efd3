"""Tensor and expert parallelism compute what one device computes: two gloo ranks on the CPU, each loading only its
shard, decode the same greedy tokens (and logits) as one process, for every decoder family, with KV heads
replicated past their count, and for MoE families with experts sliced (TP) or split across the ranks (EP); and the
engine serves a model through two runner processes."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from loomserve import LLM, SamplingParams
from loomserve.platform.config import EngineArgs
from loomserve.testing.checkpoints import tiny_checkpoint
from loomserve.testing.moe_checkpoints import tiny_moe_checkpoint

sys.path.insert(0, str(Path(__file__).parents[1]))  # paged_batch, beside the platform tests
from paged_batch import greedy_decode, load  # noqa: E402

# case -> (checkpoint builder, its arguments, experts split across the ranks)
CASES = {
    "llama": (tiny_checkpoint, ("llama",), {}, False),
    "mistral-kv1": (tiny_checkpoint, ("mistral",), {"num_kv_heads": 1}, False),  # one KV head, replicated
    "qwen2-tied": (tiny_checkpoint, ("qwen2",), {"tie_word_embeddings": True}, False),
    "qwen3": (tiny_checkpoint, ("qwen3",), {}, False),
    "qwen2_moe-tp": (tiny_moe_checkpoint, ("qwen2_moe",), {}, False),
    "mixtral-ep": (tiny_moe_checkpoint, ("mixtral",), {}, True),
    "olmoe-tp": (tiny_moe_checkpoint, ("olmoe",), {}, False),  # query/key norms over all heads, split
}
TOLERANCE = 1e-5


def checkpoint(case: str) -> Path:
    build, args, kwargs, _ = CASES[case]
    return build(*args, **kwargs)


def greedy(path: Path) -> tuple[list[list[int]], torch.Tensor, int]:
    return greedy_decode(load(path))


def _rank_main(rank: int, size: int, init_method: str, out: str) -> None:
    from loomserve.platform.distributed.parallel_state import init_tensor_parallel

    results = {}
    for case, (*_, expert_parallel) in CASES.items():
        init_tensor_parallel(rank, size, init_method, torch.device("cpu"), expert_parallel)
        results[case] = greedy(checkpoint(case))
    if rank == 0:
        torch.save(results, out)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list[list[int]], torch.Tensor, int]]:
    """Every case decoded by two gloo ranks (rank 0's view; every rank ends with the same logits)."""
    from loomserve.platform.executor import _free_port

    for case in CASES:
        checkpoint(case)  # built once here, not raced by the ranks
    out = tmp_path_factory.mktemp("tp") / "results.pt"
    mp.spawn(_rank_main, args=(2, f"tcp://127.0.0.1:{_free_port()}", str(out)), nprocs=2)
    return torch.load(out)


@functools.cache
def one_device(case: str) -> tuple[list[list[int]], torch.Tensor, int]:
    return greedy(checkpoint(case))


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_decode_what_one_device_decodes(case: str, two_ranks) -> None:
    tokens, logits, num_params = two_ranks[case]
    expected_tokens, expected_logits, all_params = one_device(case)
    assert num_params < 0.75 * all_params  # a rank holds its shard only (norms and the router are replicated)
    assert tokens == expected_tokens
    assert ((logits - expected_logits).abs().max() / expected_logits.abs().max()).item() < TOLERANCE


def test_engine_with_two_runner_ranks_and_expert_parallel_equals_one_process() -> None:
    """Steps broadcast to two runner processes (rank 0 answering) serve a MoE model with a shared expert."""
    path = str(tiny_moe_checkpoint("qwen2_moe"))
    prompts = ["hello world", "the cat sat on the mat and then it", "a"]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in LLM(path, block_size=4, kv_cache_memory="8MiB").generate(prompts,
                                                                                                          params)]
    llm = LLM(path, block_size=4, kv_cache_memory="8MiB", tensor_parallel_size=2, enable_expert_parallel=True)
    try:
        assert len(llm.engine.executor.ranks) == 2
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == expected
    finally:
        llm.engine.shutdown()


def test_heads_that_do_not_divide_are_refused_before_loading(qwen2_checkpoint) -> None:
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) is not divisible by the tensor-parallel size 3"):
        EngineArgs(qwen2_checkpoint, device="cpu", tensor_parallel_size=3).create_engine_config()


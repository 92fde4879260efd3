"""On CUDA, the engine with the Triton backend (and CUDA graphs) gives the torch backend's greedy output."""

from __future__ import annotations

import pytest
import torch

from loomserve import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PROMPTS = ["hello world", "the cat sat on the mat and then it", "a", "café naïve 日本語 " * 6]


# ~840 tokens: chunks of it see contexts longer than one KV split (512 keys) beside the short prompts' decodes.
LONG_PROMPTS = PROMPTS + ["the cat sat on the mat and then it " * 60]


def greedy_ids(path: str, prompts: list[str] = PROMPTS, **engine_args) -> list[list[int]]:
    llm = LLM(path, device="cuda", dtype="float32", block_size=16, kv_cache_memory="64MiB", **engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def test_triton_backend_with_cuda_graphs_equals_torch_backend(family_checkpoint):
    _, path = family_checkpoint
    reference = greedy_ids(path, attention_backend="torch")
    assert greedy_ids(path, attention_backend="triton") == reference
    assert greedy_ids(path, attention_backend="triton", enforce_eager=True) == reference


def test_triton_backend_with_chunked_prefill_equals_torch_backend(family_checkpoint):
    _, path = family_checkpoint
    reference = greedy_ids(path, attention_backend="torch")
    assert greedy_ids(path, attention_backend="triton", max_num_batched_tokens=8) == reference


def test_triton_backend_over_long_contexts_in_mixed_graphs_equals_torch_backend(family_checkpoint):
    _, path = family_checkpoint
    reference = greedy_ids(path, LONG_PROMPTS, attention_backend="torch")
    assert greedy_ids(path, LONG_PROMPTS, attention_backend="triton", max_num_batched_tokens=128) == reference
    assert greedy_ids(path, LONG_PROMPTS, attention_backend="triton", max_num_batched_tokens=128,
                      max_cudagraph_capture_size=0) == reference


def test_kv_cache_sizing_reserves_what_the_captured_graphs_keep(qwen2_checkpoint):
    llm = LLM(qwen2_checkpoint, device="cuda", dtype="bfloat16", max_num_seqs=64, gpu_memory_utilization=0.5)
    runner = llm.engine.executor.runner
    graphs = runner.cuda_graphs
    kept = sum(t.numel() * t.element_size() for t in (*graphs.logits.values(), *graphs.hidden.values()))
    assert kept > 0 and runner._graph_memory() >= kept

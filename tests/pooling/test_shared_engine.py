"""Pooling requests share the engine with generation: interleaved in the same steps, both stay equal to
transformers, and every KV block is free once they finish. With async scheduling a step's pooled outputs land
with its sampled tokens, in step order, while the next step is already running (tests/pooling/
test_scheduler_pooling.py covers a pooling request preempted while its step is in flight)."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from loomserve import LLM, PoolingParams, SamplingParams
from loomserve.platform.engine import EngineCore
from loomserve.platform.messages import EngineCoreRequest
from loomserve.testing.checkpoints import tiny_checkpoint

GENERATE = {"g0": "hello world",
            "g1": "café naïve 日本語 and some more words so that this prompt crosses several blocks"}
# request id -> (prompt, pooling type); a MEAN prompt runs whole, so it must fit the step budget of 16 tokens.
EMBED = {"e0": ("the cat sat on the mat and then it", "MEAN"), "e1": ("a", "LAST"),
         "e2": ("Once upon a time, there was a little girl who lived in a village", "LAST")}
ARRIVALS = {0: ["g0", "e0"], 2: ["e1", "g1"], 5: ["e2"]}  # step -> requests added before it
MAX_TOKENS = 12


@functools.cache
def path() -> str:
    return str(tiny_checkpoint("qwen3"))


@functools.cache
def references() -> tuple[dict[str, list[int]], dict[str, torch.Tensor]]:
    """transformers' greedy continuations of GENERATE and normalized pooled hidden states of EMBED."""
    tokenizer = AutoTokenizer.from_pretrained(path())
    lm = AutoModelForCausalLM.from_pretrained(path(), dtype=torch.float32)
    base = AutoModel.from_pretrained(path(), dtype=torch.float32)
    tokens = {}
    for request_id, text in GENERATE.items():
        ids = tokenizer(text, return_tensors="pt").input_ids
        want = lm.generate(ids, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False)
        tokens[request_id] = want[0, ids.shape[1]:].tolist()
    pooled = {}
    for request_id, (text, pooling_type) in EMBED.items():
        hidden = base(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]
        vector = hidden.mean(dim=0) if pooling_type == "MEAN" else hidden[-1]
        pooled[request_id] = torch.nn.functional.normalize(vector, dim=-1)
    return tokens, pooled


def run_interleaved(
    llm: LLM, arrivals: dict[int, list[str]] = ARRIVALS
) -> tuple[dict[str, list[int]], dict[str, torch.Tensor], int]:
    """Feed `arrivals` to the engine step by step; the tokens and pooled outputs it returned, and how many steps
    landed pooled outputs while the next step was already launched. Checks that each landed step hands out its
    outputs in the order of its scheduled requests."""
    engine: EngineCore = llm.engine
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    pooled = {}
    overlapped = 0
    step = 0
    while step <= max(arrivals) or engine.has_requests():
        for request_id in arrivals.get(step, []):
            if request_id in GENERATE:
                ids = llm.tokenizer.encode(GENERATE[request_id])
                tokens[request_id] = []
                engine.add_request(llm.input_processor.engine_request(request_id, ids, greedy))
            else:
                text, pooling_type = EMBED[request_id]
                params = llm.config.model_config.pooler_config.resolve(PoolingParams(pooling_type=pooling_type))
                engine.add_request(EngineCoreRequest(request_id, llm.tokenizer.encode(text), None, None, 0.0,
                                                     pooling_params=params))
        landing = engine.in_flight  # with async scheduling, the step this one lands
        outputs = engine.step().outputs
        if landing is not None:
            ids = [out.request_id for out in outputs]
            assert ids == [s.request_id for s in landing[0].scheduled if s.request_id in ids]
        for out in outputs:
            if out.pooled is not None:
                assert out.new_token_ids == [] and out.finish_reason == "stop"
                pooled[out.request_id] = out.pooled
            else:
                tokens[out.request_id] += out.new_token_ids
        overlapped += any(out.pooled is not None for out in outputs) and engine.in_flight is not None
        step += 1
    return tokens, pooled, overlapped


def check_outputs(
    tokens: dict[str, list[int]], pooled: dict[str, torch.Tensor], arrivals: dict[int, list[str]] = ARRIVALS
) -> None:
    """Every request of `arrivals` gave transformers' output: its greedy tokens, or its pooled vector."""
    want_tokens, want_pooled = references()
    request_ids = [request_id for arrived in arrivals.values() for request_id in arrived]
    assert tokens == {request_id: want_tokens[request_id] for request_id in request_ids if request_id in GENERATE}
    assert set(pooled) == {request_id for request_id in request_ids if request_id in EMBED}
    for request_id, vector in pooled.items():
        assert torch.allclose(vector, want_pooled[request_id], atol=1e-5), request_id


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_embeddings_interleaved_with_generation_leave_both_correct(async_scheduling):
    # A small step budget chunks the long prompts, so prefill chunks, decodes and pooling share steps.
    llm = LLM(path(), block_size=4, kv_cache_memory="8MiB", max_num_batched_tokens=16,
              async_scheduling=async_scheduling)
    tokens, pooled, overlapped = run_interleaved(llm)
    check_outputs(tokens, pooled)
    assert (overlapped > 0) == async_scheduling  # async: pooled outputs landed behind a step already launched
    kv = llm.engine.scheduler.kv
    assert kv.pool.num_free_blocks == kv.pool.num_blocks and llm.engine.in_flight is None


def test_async_scheduling_with_preemption_keeps_embeddings_and_generation_correct():
    # 16 blocks of 4 tokens hold less than the requests need together: the long generation and the chunked
    # last-token embedding are preempted and run again.
    llm = LLM(path(), block_size=4, num_gpu_blocks_override=16, max_model_len=64, max_num_batched_tokens=16,
              async_scheduling=True)
    tokens, pooled, _ = run_interleaved(llm)
    check_outputs(tokens, pooled)
    assert llm.engine.scheduler.total_preemptions > 0
    assert llm.engine.scheduler.kv.pool.num_free_blocks == 16


def test_embeddings_and_generation_sharing_steps_in_a_runner_process_stay_correct():
    """The runner in its own process: pooled vectors come back inside the step results."""
    llm = LLM(path(), block_size=4, kv_cache_memory="8MiB", max_num_batched_tokens=16,
              distributed_executor_backend="mp")
    try:
        tokens, pooled, _ = run_interleaved(llm)
    finally:
        llm.engine.shutdown()
    check_outputs(tokens, pooled)

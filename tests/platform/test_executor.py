"""The multi-process executor: a runner in its own process, fed steps in their wire form, computes what the
in-process runner computes (greedy equal to transformers, batched equal to unbatched, through preemptions, chunks
and async scheduling), and a runner that dies is reported at once, not waited on."""

from __future__ import annotations

import pytest
from test_engine_greedy import GREEDY, PROMPTS, reference, token_ids

from loomserve import LLM, SamplingParams

SEEDED = SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def mp_llm(qwen2_checkpoint):
    llm = LLM(qwen2_checkpoint, distributed_executor_backend="mp", device="cpu", block_size=4,
              kv_cache_memory="32MiB")
    yield llm
    llm.engine.shutdown()


def test_greedy_in_a_runner_process_equals_transformers(mp_llm, qwen2_checkpoint):
    assert token_ids(mp_llm.generate(PROMPTS, GREEDY)) == reference(qwen2_checkpoint)


def test_a_batch_in_a_runner_process_equals_each_request_alone(mp_llm):
    batched = token_ids(mp_llm.generate(PROMPTS, SEEDED))
    assert batched == [token_ids(mp_llm.generate(p, SEEDED))[0] for p in PROMPTS]


def test_preemption_chunks_and_async_scheduling_in_a_runner_process_equal_transformers(qwen2_checkpoint):
    llm = LLM(qwen2_checkpoint, distributed_executor_backend="mp", device="cpu", block_size=4,
              num_gpu_blocks_override=24, max_model_len=96, max_num_batched_tokens=6, async_scheduling=True)
    try:
        assert token_ids(llm.generate(PROMPTS, GREEDY)) == reference(qwen2_checkpoint)
        assert llm.engine.scheduler.total_preemptions > 0
    finally:
        llm.engine.shutdown()


def test_a_runner_process_that_dies_fails_the_next_step_at_once(qwen2_checkpoint):
    llm = LLM(qwen2_checkpoint, distributed_executor_backend="mp", device="cpu", block_size=4, kv_cache_memory="8MiB")
    llm.engine.executor.ranks[0].process.kill()
    with pytest.raises(RuntimeError, match="the runner process died"):
        llm.generate("hello", GREEDY)
    llm.engine.shutdown()

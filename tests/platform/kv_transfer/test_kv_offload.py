"""The CPU tier of the prefix cache: a multi-turn workload whose shared prefixes exceed the device pool gets its
prefixes back from host memory, with outputs equal to transformers' under greedy decoding; the step data crosses a
process boundary; preemption resumes from the tier; a request that ends while its blocks wait frees them."""

from __future__ import annotations

import pytest
from kv_workload import FIRST_TURNS, GREEDY, SECOND_TURNS

from loomserve import LLM, SamplingParams
from loomserve.platform.messages import EngineCoreRequest

SMALL_DEVICE_POOL = {"block_size": 4, "num_gpu_blocks_override": 16, "max_model_len": 64}
OFFLOAD_GIB = 0.01  # ~5,000 host blocks of the tiny model


def _two_turns(llm: LLM) -> list:
    """Each conversation's first turn, one at a time, then each second turn: a later turn's prefix has been pushed
    out of the device pool by the other conversations by then."""
    for prompt in FIRST_TURNS:
        llm.generate(prompt, GREEDY)
    return [llm.generate(prompt, GREEDY)[0] for prompt in SECOND_TURNS]


def _token_ids(outputs: list) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_prefixes_evicted_from_the_device_come_back_from_the_cpu_tier_with_unchanged_output(
    qwen2_checkpoint, greedy_reference
):
    llm = LLM(qwen2_checkpoint, kv_offloading_size=OFFLOAD_GIB, **SMALL_DEVICE_POOL)
    second = _two_turns(llm)
    assert _token_ids(second) == greedy_reference(SECOND_TURNS)
    assert all(o.num_cached_tokens >= 32 for o in second)  # every shared prefix was a hit
    assert llm.engine.scheduler.hook("kv_offload").loaded_tokens >= 4 * 32  # ... brought back from host memory
    assert llm.engine.scheduler.kv.pool.num_free_blocks == 16  # the held blocks went back to the pool


def test_an_fp8_cache_comes_back_from_the_cpu_tier_with_unchanged_output(qwen2_checkpoint):
    # The tier copies an fp8 cache's blocks as bytes: the output is the fp8 cache's own, with no eviction at all.
    roomy = LLM(qwen2_checkpoint, kv_cache_dtype="fp8", block_size=4, max_model_len=64)
    expected = [roomy.generate(prompt, GREEDY)[0] for prompt in SECOND_TURNS]
    llm = LLM(qwen2_checkpoint, kv_cache_dtype="fp8", kv_offloading_size=OFFLOAD_GIB, **SMALL_DEVICE_POOL)
    second = _two_turns(llm)
    assert _token_ids(second) == _token_ids(expected)
    assert llm.engine.scheduler.hook("kv_offload").loaded_tokens >= 4 * 32


def test_without_the_cpu_tier_the_same_workload_misses(qwen2_checkpoint):
    llm = LLM(qwen2_checkpoint, **SMALL_DEVICE_POOL)
    assert all(o.num_cached_tokens == 0 for o in _two_turns(llm))


def test_the_cpu_tier_with_a_runner_process_gives_the_same_output(qwen2_checkpoint, greedy_reference):
    llm = LLM(qwen2_checkpoint, kv_offloading_size=OFFLOAD_GIB, distributed_executor_backend="mp", device="cpu",
              **SMALL_DEVICE_POOL)
    try:
        second = _two_turns(llm)
        assert _token_ids(second) == greedy_reference(SECOND_TURNS)
        assert all(o.num_cached_tokens >= 32 for o in second)
    finally:
        llm.engine.shutdown()


def test_preempted_requests_resume_from_the_cpu_tier_with_unchanged_output(qwen2_checkpoint, greedy_reference):
    # Four short prompts start together and grow to ~40 tokens each in a 16-block pool: requests are preempted, their
    # blocks evicted to host memory.
    prompts = [p[:12] for p in FIRST_TURNS]
    llm = LLM(qwen2_checkpoint, kv_offloading_size=OFFLOAD_GIB, **SMALL_DEVICE_POOL)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=28, ignore_eos=True))
    assert _token_ids(outputs) == greedy_reference(prompts, 28)
    assert llm.engine.scheduler.total_preemptions > 0
    assert llm.engine.scheduler.hook("kv_offload").loaded_tokens > 0


@pytest.mark.parametrize("when", ["loading", "loaded"])
def test_a_request_aborted_while_its_blocks_wait_frees_them(qwen2_checkpoint, when):
    llm = LLM(qwen2_checkpoint, kv_offloading_size=OFFLOAD_GIB, **SMALL_DEVICE_POOL)
    _two_turns(llm)
    engine, hook = llm.engine, llm.engine.scheduler.hook("kv_offload")
    token_ids = llm.tokenizer(FIRST_TURNS[0]).input_ids
    engine.add_request(EngineCoreRequest("r", token_ids, GREEDY, None, 0.0))
    if when == "loaded":
        engine.step()  # on the CPU a load lands within its step: the blocks are held for the request
        assert "r" in hook.held
    else:
        assert not engine.scheduler.hook("kv_offload").admits(engine.scheduler.requests["r"])
        assert "r" in hook.loading
    engine.abort_requests(["r"])
    while engine.has_requests() or hook.loading:
        engine.step()
    assert engine.scheduler.kv.pool.num_free_blocks == 16

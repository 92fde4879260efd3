"""The CPU tier of the prefix cache: a multi-turn workload whose shared prefixes exceed the device pool gets its
prefixes back from host memory, with outputs equal to transformers' under greedy decoding; the step data crosses a
process boundary; preemption resumes from the tier; a request is scheduled in the step its blocks load in; a request
that ends before it could start on its loaded blocks frees them."""

from __future__ import annotations

import pytest
import torch
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


ON_CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))


# On CUDA the loads run on a side stream the forward waits for: float32, so transformers' float32 answers are the
# reference there too.
@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
def test_prefixes_evicted_from_the_device_come_back_from_the_cpu_tier_with_unchanged_output(
    qwen2_checkpoint, greedy_reference, device
):
    llm = LLM(qwen2_checkpoint, kv_offloading_size=OFFLOAD_GIB, device=device, dtype="float32", **SMALL_DEVICE_POOL)
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


def test_a_request_with_blocks_in_the_cpu_tier_is_scheduled_in_the_step_that_loads_them(qwen2_checkpoint):
    llm = LLM(qwen2_checkpoint, kv_offloading_size=OFFLOAD_GIB, **SMALL_DEVICE_POOL)
    _two_turns(llm)
    engine, hook = llm.engine, llm.engine.scheduler.hook("kv_offload")
    engine.add_request(EngineCoreRequest("r", llm.tokenizer(FIRST_TURNS[0]).input_ids, GREEDY, None, 0.0))
    step = engine.scheduler.schedule()
    assert hook.loads["r"] >= 32 and step.features["kv_offload"]["load"][0]
    assert [(s.request_id, s.start) for s in step.scheduled] == [("r", hook.loads["r"])]


def test_a_request_that_cannot_start_after_its_load_frees_the_blocks_when_aborted(qwen2_checkpoint):
    llm = LLM(qwen2_checkpoint, kv_offloading_size=OFFLOAD_GIB, **SMALL_DEVICE_POOL)
    _two_turns(llm)
    engine, hook = llm.engine, llm.engine.scheduler.hook("kv_offload")
    engine.add_request(EngineCoreRequest("r", llm.tokenizer(FIRST_TURNS[0]).input_ids, GREEDY, None, 0.0))
    assert hook.admits(engine.scheduler.requests["r"])  # its load is issued, as when a later hook holds it back
    assert "r" in hook.held
    engine.abort_requests(["r"])
    engine.step()  # the load issued still goes out, into blocks that stay cached
    assert engine.scheduler.kv.pool.num_free_blocks == 16
    assert not hook.host.readers  # its host blocks may be given to stores again

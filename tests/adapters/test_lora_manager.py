"""The adapter manager inside a real engine: loads run beside the steps (never stalling them), the host cache
keeps the adapters of running requests and evicts the least recently used others, ids name one adapter."""

from __future__ import annotations

import threading
import time

import pytest
from peft_reference import PROMPTS, peft_greedy

from loomserve import LLM, LoRARequest, SamplingParams
from loomserve.platform.messages import AddLoRA, CallReply


def engine_request(llm: LLM, request_id: str, lora: LoRARequest | None, max_tokens: int = 8):
    ids = llm.get_tokenizer().encode(PROMPTS[1])
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return llm.input_processor.engine_request(request_id, ids, params, lora_request=lora)


@pytest.fixture
def adapters(qwen2_checkpoint, make_lora) -> list[str]:
    return [make_lora(qwen2_checkpoint, f"m{i}", seed=50 + i, r=4, target_modules=["q_proj", "down_proj"])
            for i in range(3)]


def test_a_slow_adapter_load_does_not_stall_the_steps(qwen2_checkpoint, adapters):
    llm = LLM(qwen2_checkpoint, enable_lora=True, max_loras=2, block_size=4, kv_cache_memory="32MiB")
    engine, manager = llm.engine, llm.engine.executor.runner.hook("lora").manager
    disk = threading.Event()  # a slow disk: reads wait until it is set
    read = manager._read
    manager._read = lambda lora: disk.wait(60) and read(lora)
    engine.add_request(engine_request(llm, "base", None, max_tokens=6))
    engine.call(AddLoRA(7, LoRARequest("a", 1, adapters[0])))
    engine.add_request(engine_request(llm, "waits", LoRARequest("b", 2, adapters[1])))
    tokens = [o for _ in range(6) for o in engine.step().outputs if o.request_id == "base"]
    assert len(tokens) == 6 and tokens[-1].finish_reason == "length"  # the base request ran to its end
    assert engine.take_call_replies() == [] and engine.scheduler.requests["waits"].num_computed_tokens == 0
    disk.set()
    replies, waits = [], []
    while not replies or not (waits and waits[-1].finish_reason):
        replies += engine.take_call_replies()
        waits += [o for o in engine.step().outputs if o.request_id == "waits"]
    assert replies == [CallReply(7, None)]
    assert [o.new_token_ids[0] for o in waits] == peft_greedy(qwen2_checkpoint, adapters[1], (PROMPTS[1],), 8)[0]


def test_host_cache_evicts_least_recently_used_but_keeps_running_adapters(qwen2_checkpoint, adapters):
    llm = LLM(qwen2_checkpoint, enable_lora=True, max_loras=1, max_cpu_loras=2, block_size=4,
              kv_cache_memory="32MiB")
    engine, manager = llm.engine, llm.engine.executor.runner.hook("lora").manager
    a, b, c = (LoRARequest(f"l{i}", i + 1, path) for i, path in enumerate(adapters))
    engine.add_lora(a)
    engine.add_lora(b)
    engine.add_request(engine_request(llm, "runs", a))
    engine.step()  # a's request runs: a is pinned
    engine.add_lora(c)  # the cache is full: b, least recently used and idle, goes, not a
    assert list(manager.cpu) == [1, 3]
    engine.add_lora(b)
    assert list(manager.cpu) == [1, 2]  # now c was the idle one
    with pytest.raises(ValueError, match="LoRA id 1 already names adapter 'l0'"):
        engine.add_lora(LoRARequest("other", 1, adapters[2]))


def test_removing_an_adapter_lets_its_running_request_finish(qwen2_checkpoint, adapters):
    llm = LLM(qwen2_checkpoint, enable_lora=True, max_loras=1, block_size=4, kv_cache_memory="32MiB")
    engine, manager = llm.engine, llm.engine.executor.runner.hook("lora").manager
    a = LoRARequest("a", 1, adapters[0])
    engine.add_lora(a)
    engine.add_request(engine_request(llm, "runs", a))
    outputs = engine.step().outputs
    engine.remove_lora(1)
    assert 1 in manager.cpu and 1 in manager.slots  # still in use
    while engine.has_requests():
        outputs += engine.step().outputs
    assert [o.new_token_ids[0] for o in outputs] == peft_greedy(qwen2_checkpoint, adapters[0], (PROMPTS[1],), 8)[0]
    engine.add_request(engine_request(llm, "next", None))
    engine.step()  # the first step without it lets its weights go
    assert 1 not in manager.cpu and 1 not in manager.slots


def test_an_adapter_call_to_a_runner_process_is_answered_once_read_and_its_requests_run(qwen2_checkpoint, adapters):
    llm = LLM(qwen2_checkpoint, enable_lora=True, max_loras=2, block_size=4, kv_cache_memory="32MiB",
              distributed_executor_backend="mp", device="cpu")
    engine = llm.engine
    try:
        engine.call(AddLoRA(3, LoRARequest("a", 1, adapters[0])))
        engine.call(AddLoRA(4, LoRARequest("gone", 2, "/no/such/adapter")))
        errors, deadline = {}, time.monotonic() + 60
        while len(errors) < 2 and time.monotonic() < deadline:
            errors.update((r.call_id, r.error) for r in engine.take_call_replies())
        assert errors[3] is None and "/no/such/adapter" in errors[4]
        engine.add_request(engine_request(llm, "runs", LoRARequest("a", 1, adapters[0])))
        outputs = []
        while engine.has_requests():
            outputs += engine.step().outputs
    finally:
        engine.shutdown()
    want = peft_greedy(qwen2_checkpoint, adapters[0], (PROMPTS[1],), 8)[0]
    assert [t for o in outputs for t in o.new_token_ids] == want


def test_a_request_whose_adapter_fails_to_load_ends_with_an_abort_output_even_across_adapter_calls(
        qwen2_checkpoint, adapters):
    llm = LLM(qwen2_checkpoint, enable_lora=True, max_loras=2, block_size=4, kv_cache_memory="32MiB")
    engine, manager = llm.engine, llm.engine.executor.runner.hook("lora").manager
    disk = threading.Event()  # the broken adapter's read fails only once this is set
    read = manager._read
    manager._read = lambda lora: (lora.lora_int_id != 2 or disk.wait(60)) and read(lora)
    engine.add_request(engine_request(llm, "broken", LoRARequest("gone", 2, "/no/such/adapter")))
    outputs = engine.step().outputs  # asks the runner to read the adapter, in the background
    [load] = manager.loads.values()
    disk.set()
    assert load.exception(timeout=60) is not None  # failed, and not yet reported by a step
    engine.add_lora(LoRARequest("a", 1, adapters[0]))  # an adapter call between the failure and the next step
    while engine.has_requests():
        outputs += engine.step().outputs
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("broken", "abort")]

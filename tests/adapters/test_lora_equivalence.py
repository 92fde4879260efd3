"""Served adapters compute what peft computes: greedy output equals `PeftModel.generate` token for token in
float32, for every adapter shape on every decoder family, whatever else shares the batch."""

from __future__ import annotations

import pytest
from peft_reference import MAX_TOKENS, PROMPTS, SHAPES, peft_greedy

from loomserve import LLM, LoRARequest, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_every_adapter_shape_equals_peft_with_all_shapes_in_one_batch(family_checkpoint, shaped_adapters):
    """Ranks 8 (q, v), 16 (all-linear) and rslora with per-module rank and alpha, all in one batch."""
    _, base = family_checkpoint
    adapters = shaped_adapters(base)
    llm = LLM(base, enable_lora=True, max_loras=len(SHAPES), max_lora_rank=16, block_size=4,
              kv_cache_memory="32MiB")
    loras = [LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters.items())]
    prompts = [p for _ in loras for p in PROMPTS]
    requests = [lora for lora in loras for _ in PROMPTS]
    got = token_ids(llm.generate(prompts, GREEDY, lora_request=requests))
    base_ids = peft_greedy(base, None)
    for i, lora in enumerate(loras):
        expected = peft_greedy(base, lora.lora_path)
        assert got[i * len(PROMPTS) : (i + 1) * len(PROMPTS)] == expected, lora.lora_name
        assert expected != base_ids, f"{lora.lora_name} does not change the output: the test would prove nothing"


def test_mixed_batch_of_base_and_three_adapters_equals_each_request_alone(qwen2_checkpoint, shaped_adapters):
    adapters = shaped_adapters(qwen2_checkpoint)
    loras = [None] + [LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters.items())]
    llm = LLM(qwen2_checkpoint, enable_lora=True, max_loras=3, max_lora_rank=16, block_size=4,
              kv_cache_memory="32MiB", enable_prefix_caching=False)
    # The same prompts under every adapter, interleaved, so one step holds tokens of all four.
    prompts = [p for p in PROMPTS for _ in loras]
    requests = [lora for _ in PROMPTS for lora in loras]
    mixed = token_ids(llm.generate(prompts, GREEDY, lora_request=requests))
    alone = [token_ids(llm.generate(p, GREEDY, lora_request=lora))[0] for p, lora in zip(prompts, requests)]
    assert mixed == alone
    assert len({tuple(ids) for ids in mixed[: len(loras)]}) == len(loras)  # the four really differ


def test_prefix_cache_is_never_shared_across_adapters(qwen2_checkpoint, shaped_adapters):
    adapters = shaped_adapters(qwen2_checkpoint)
    a = LoRARequest("a", 1, adapters["qv-r8"])
    b = LoRARequest("b", 2, adapters["all-r16"])
    llm = LLM(qwen2_checkpoint, enable_lora=True, max_loras=2, max_lora_rank=16, block_size=4,
              kv_cache_memory="32MiB")
    prompt = PROMPTS[2]
    first = llm.generate(prompt, GREEDY, lora_request=a)[0]
    other = llm.generate(prompt, GREEDY, lora_request=b)[0]
    base = llm.generate(prompt, GREEDY)[0]
    again = llm.generate(prompt, GREEDY, lora_request=a)[0]
    assert (first.num_cached_tokens, other.num_cached_tokens, base.num_cached_tokens) == (0, 0, 0)
    assert again.num_cached_tokens >= 16  # the same adapter does reuse its own blocks
    assert again.outputs[0].token_ids == first.outputs[0].token_ids == peft_greedy(qwen2_checkpoint, a.lora_path)[2]
    assert other.outputs[0].token_ids == peft_greedy(qwen2_checkpoint, b.lora_path)[2]


def test_more_adapters_than_the_cpu_cache_in_rotation_stay_correct(qwen2_checkpoint, make_lora):
    """Five adapters through 2 slots and a host cache of 2: evicted adapters are read again from disk."""
    paths = [make_lora(qwen2_checkpoint, f"rot{i}", seed=100 + i, r=4 + 2 * i, lora_alpha=8,
                       target_modules=["q_proj", "v_proj", "down_proj"]) for i in range(5)]
    loras = [LoRARequest(f"rot{i}", i + 1, p) for i, p in enumerate(paths)]
    llm = LLM(qwen2_checkpoint, enable_lora=True, max_loras=2, max_cpu_loras=2, max_lora_rank=16, block_size=4,
              kv_cache_memory="32MiB")
    manager = llm.engine.executor.runner.hook("lora").manager
    reads = []
    read = manager._read
    manager._read = lambda lora: reads.append(lora.lora_int_id) or read(lora)
    prompts = [PROMPTS[i % 2] for i in range(10)]
    requests = [loras[i % 5] for i in range(10)]
    got = token_ids(llm.generate(prompts, GREEDY, lora_request=requests))
    for i, (ids, lora) in enumerate(zip(got, requests)):
        assert ids == peft_greedy(qwen2_checkpoint, lora.lora_path)[i % 2], lora.lora_name
    assert len(manager.cpu) <= 2
    assert len(reads) > 5  # adapters were evicted and read again


def test_adapter_needs_lora_enabled_and_a_servable_folder(qwen2_checkpoint, shaped_adapters, tmp_path):
    path = shaped_adapters(qwen2_checkpoint)["all-r16"]
    plain = LLM(qwen2_checkpoint, block_size=4, kv_cache_memory="32MiB")
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        plain.generate("hi", GREEDY, lora_request=LoRARequest("a", 1, path))
    llm = LLM(qwen2_checkpoint, enable_lora=True, max_lora_rank=8, block_size=4, kv_cache_memory="32MiB")
    with pytest.raises(ValueError, match="LoRA rank 16 is greater than max_lora_rank 8"):
        llm.generate(["hi", "there"], GREEDY, lora_request=[None, LoRARequest("a", 1, path)])
    assert not llm.engine.has_requests()  # refused before any request started
    with pytest.raises(ValueError, match="not a folder"):
        llm.generate("hi", GREEDY, lora_request=LoRARequest("gone", 2, str(tmp_path / "nothing")))


def test_adapters_and_the_base_sharing_steps_in_a_runner_process_equal_peft(qwen2_checkpoint, shaped_adapters):
    """The runner in its own process: adapters are named in the steps and read there."""
    adapters = shaped_adapters(qwen2_checkpoint)
    loras = [None] + [LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters.items())]
    llm = LLM(qwen2_checkpoint, enable_lora=True, max_loras=3, max_lora_rank=16, block_size=4,
              kv_cache_memory="32MiB", distributed_executor_backend="mp")
    try:
        prompts = [p for p in PROMPTS for _ in loras]
        requests = [lora for _ in PROMPTS for lora in loras]
        got = token_ids(llm.generate(prompts, GREEDY, lora_request=requests))
    finally:
        llm.engine.shutdown()
    expected = {None: peft_greedy(qwen2_checkpoint, None)}
    expected.update({lora: peft_greedy(qwen2_checkpoint, lora.lora_path) for lora in loras[1:]})
    assert got == [expected[lora][i] for i in range(len(PROMPTS)) for lora in loras]

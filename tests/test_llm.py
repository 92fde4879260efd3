"""The offline API (`LLM.generate` / `LLM.chat`) end to end: sampling controls, stops, logprobs, seeds."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from loomserve import LLM, SamplingParams

PROMPT = "the cat sat on the mat and then it"


@pytest.fixture(scope="module")
def llm(qwen2_checkpoint) -> LLM:
    return LLM(qwen2_checkpoint, block_size=4, kv_cache_memory="32MiB")


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, **{"max_tokens": 16, "ignore_eos": True, **kw})


def test_prompt_as_text_or_token_ids_gives_the_same_output(llm):
    ids = llm.get_tokenizer().encode(PROMPT)
    by_text, by_ids = llm.generate([PROMPT, ids], greedy())
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids
    assert by_text.prompt_token_ids == ids


def test_text_is_the_decoded_token_ids(llm):
    out = llm.generate(PROMPT, greedy(max_tokens=24))[0].outputs[0]
    assert out.text == llm.get_tokenizer().decode(out.token_ids, skip_special_tokens=True)


def test_max_tokens_finishes_with_length(llm):
    out = llm.generate(PROMPT, greedy(max_tokens=5))[0].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_stop_string_truncates_text_and_finishes_with_stop(llm):
    full = llm.generate(PROMPT, greedy(max_tokens=24))[0].outputs[0].text
    stop = full[6:9]
    out = llm.generate(PROMPT, greedy(max_tokens=24, stop=[stop]))[0].outputs[0]
    assert out.text == full[: full.index(stop)]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)


def test_stop_string_can_be_kept_in_output(llm):
    full = llm.generate(PROMPT, greedy(max_tokens=24))[0].outputs[0].text
    stop = full[6:9]
    out = llm.generate(PROMPT, greedy(max_tokens=24, stop=[stop], include_stop_str_in_output=True))[0].outputs[0]
    assert out.text == full[: full.index(stop) + len(stop)]


def test_stop_token_id_finishes_and_is_reported(llm):
    ids = llm.generate(PROMPT, greedy())[0].outputs[0].token_ids
    out = llm.generate(PROMPT, greedy(stop_token_ids=[ids[3]]))[0].outputs[0]
    assert out.token_ids == ids[:4]
    assert (out.finish_reason, out.stop_reason) == ("stop", ids[3])


def test_min_tokens_keeps_stop_tokens_out_until_reached(llm):
    first = llm.generate(PROMPT, greedy())[0].outputs[0].token_ids[0]
    out = llm.generate(PROMPT, greedy(stop_token_ids=[first], min_tokens=4))[0].outputs[0]
    assert first not in out.token_ids[:4]
    assert len(out.token_ids) >= 4


def test_logprobs_equal_transformers_log_softmax(llm, qwen2_checkpoint):
    out = llm.generate(PROMPT, greedy(max_tokens=4, logprobs=3))[0]
    model = AutoModelForCausalLM.from_pretrained(qwen2_checkpoint, dtype=torch.float32)
    ids = torch.tensor([out.prompt_token_ids + out.outputs[0].token_ids])
    ref = torch.log_softmax(model(ids).logits[0, len(out.prompt_token_ids) - 1 : -1], dim=-1)
    for step, (token, entry) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
        assert entry[token].rank == 1  # greedy takes the most likely token
        top = torch.topk(ref[step], 3)
        assert set(entry) == set(top.indices.tolist())
        for tid, lp in entry.items():
            assert lp.logprob == pytest.approx(ref[step, tid].item(), rel=1e-3, abs=1e-4)
            assert lp.decoded_token == llm.get_tokenizer().decode([tid])


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate(PROMPT, params)[0].outputs[0].token_ids
    mates = [SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True) for n in (3, 9, 20)]
    batch = llm.generate(["hello", "a b c", PROMPT, "xyz"], [mates[0], mates[1], params, mates[2]])
    assert batch[2].outputs[0].token_ids == alone


def test_seeded_sampling_survives_preemption(qwen2_checkpoint):
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=20, ignore_eos=True)
    roomy = LLM(qwen2_checkpoint, block_size=4, kv_cache_memory="32MiB")
    expected = [o.outputs[0].token_ids for o in roomy.generate([PROMPT] * 4, params)]
    tight = LLM(qwen2_checkpoint, block_size=4, num_gpu_blocks_override=16, max_model_len=64)
    got = [o.outputs[0].token_ids for o in tight.generate([PROMPT] * 4, params)]
    assert tight.engine.scheduler.total_preemptions > 0
    assert got == expected


def test_different_seeds_differ(llm):
    a, b = (
        llm.generate(PROMPT, SamplingParams(temperature=1.0, seed=s, max_tokens=16, ignore_eos=True))[0]
        for s in (1, 2)
    )
    assert a.outputs[0].token_ids != b.outputs[0].token_ids


def test_n_children_of_a_seeded_request_differ_from_each_other(llm):
    out = llm.generate(PROMPT, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True))[0]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3


def test_chat_renders_the_template(llm):
    messages = [{"role": "user", "content": "hello"}]
    out = llm.chat(messages, greedy(max_tokens=4))[0]
    rendered = llm.get_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert out.prompt == rendered
    assert out.prompt_token_ids == llm.get_tokenizer().encode(rendered, add_special_tokens=False)


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


TOOLS_TEMPLATE = ("{% for t in tools or [] %}<tool>{{ t.function.name }}</tool>{% endfor %}"
                  "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                  "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_chat_renders_tools_through_the_given_template_as_transformers_does(llm):
    messages = [{"role": "user", "content": "weather in Paris?"}]
    out = llm.chat(messages, greedy(max_tokens=4), tools=[WEATHER_TOOL], chat_template=TOOLS_TEMPLATE)[0]
    rendered = llm.get_tokenizer().apply_chat_template(messages, tools=[WEATHER_TOOL], chat_template=TOOLS_TEMPLATE,
                                                       tokenize=False, add_generation_prompt=True)
    assert out.prompt == rendered == "<tool>get_weather</tool><user>weather in Paris?<assistant>"


def test_chat_continues_the_final_message(llm):
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi, I am"}]
    out = llm.chat(messages, greedy(max_tokens=4), add_generation_prompt=False, continue_final_message=True)[0]
    assert out.prompt == llm.get_tokenizer().apply_chat_template(messages, tokenize=False,
                                                                 continue_final_message=True)
    assert out.prompt.endswith("Hi, I am")
    with pytest.raises(ValueError, match="continue_final_message"):
        llm.chat(messages, greedy(), continue_final_message=True)


def test_prompt_longer_than_context_is_refused_with_the_numbers(qwen2_checkpoint):
    small = LLM(qwen2_checkpoint, max_model_len=32, kv_cache_memory="8MiB")
    with pytest.raises(ValueError, match="maximum context length is 32 tokens"):
        small.generate([list(range(40))], greedy())


def test_unknown_engine_argument_is_a_type_error(qwen2_checkpoint):
    with pytest.raises(TypeError, match="no_such_flag"):
        LLM(qwen2_checkpoint, no_such_flag=1)


def test_async_scheduling_keeps_seeded_sampling_stop_ids_and_lengths(qwen2_checkpoint, llm):
    ahead = LLM(qwen2_checkpoint, block_size=4, kv_cache_memory="32MiB", async_scheduling=True)
    first = llm.generate(PROMPT, greedy())[0].outputs[0].token_ids
    params = [
        SamplingParams(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True),
        greedy(stop_token_ids=[first[5]]),
        greedy(max_tokens=7),
    ]
    expected = [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in llm.generate([PROMPT] * 3, params)]
    got = [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in ahead.generate([PROMPT] * 3, params)]
    assert got == expected


def test_a_cache_salt_in_the_prompt_keeps_its_blocks_apart(llm):
    text = "salted prompt: the quick brown fox jumps over the lazy dog " * 3
    params = SamplingParams(max_tokens=1)
    assert llm.generate({"prompt": text, "cache_salt": "a"}, params)[0].num_cached_tokens == 0
    assert llm.generate({"prompt": text, "cache_salt": "b"}, params)[0].num_cached_tokens == 0
    assert llm.generate({"prompt": text, "cache_salt": "a"}, params)[0].num_cached_tokens >= 8


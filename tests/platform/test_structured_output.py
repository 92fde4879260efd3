"""Structured output through the engine (`LLM.generate` with `SamplingParams(structured_outputs=...)`): the grammar
bitmask forces valid output even from random weights, under batching, chunked prefill, async scheduling,
preemption and speculative decoding (masks per draft position, rolled back on rejection)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from loomserve import LLM, SamplingParams
from loomserve.platform.messages import EngineCoreRequest
from loomserve.platform.structured import StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
REGEX = r"(hello |world ){3,9}done"
PROMPTS = ["hello world hello world hello", "The quick brown fox jumps over the lazy dog.", "1 2 3 4"]
ENGINE = {"block_size": 4, "kv_cache_memory": "32MiB"}


def constrained(temperature: float = 0.0, **kind) -> SamplingParams:
    return SamplingParams(temperature=temperature, seed=7, max_tokens=160,
                          structured_outputs=StructuredOutputsParams(**kind))


def texts(llm: LLM, params, prompts=PROMPTS) -> list[str]:
    return [o.outputs[0].text for o in llm.generate(prompts, params)]


def assert_valid_json(text: str) -> None:
    jsonschema.validate(json.loads(text), SCHEMA)


@pytest.fixture(scope="module")
def llm(qwen2_checkpoint) -> LLM:
    return LLM(qwen2_checkpoint, **ENGINE)


@pytest.fixture(scope="module")
def json_texts(llm) -> list[str]:
    return texts(llm, constrained(json=SCHEMA))


def test_json_schema_output_validates_from_random_weights(json_texts):
    for text in json_texts:
        assert_valid_json(text)


def test_regex_and_choice_and_grammar_outputs_match(llm):
    assert all(re.fullmatch(REGEX, t) for t in texts(llm, constrained(regex=REGEX)))
    assert all(t in ("yes", "no", "maybe so") for t in texts(llm, constrained(choice=["yes", "no", "maybe so"])))
    grammar = 'root ::= "(" item ("," item)* ")"\nitem ::= [0-9] | "x"'
    assert all(re.fullmatch(r"\(([0-9]|x)(,([0-9]|x))*\)", t) for t in texts(llm, constrained(grammar=grammar)))


def test_sampled_output_also_validates(llm):
    for text in texts(llm, constrained(temperature=1.0, json=SCHEMA)):
        assert_valid_json(text)


def test_constrained_and_unconstrained_requests_share_steps_unchanged(llm, json_texts):
    """A constrained request beside unconstrained ones gives what it gives alone, and they what they give alone."""
    free = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = texts(llm, free)
    mixed = llm.generate(PROMPTS * 2, [constrained(json=SCHEMA)] * 3 + [free] * 3)
    assert [o.outputs[0].text for o in mixed] == json_texts + alone


def test_chunked_prefill_of_a_long_prompt(qwen2_checkpoint, json_texts):
    chunked = LLM(qwen2_checkpoint, max_num_batched_tokens=8, **ENGINE)
    assert texts(chunked, constrained(json=SCHEMA)) == json_texts


def test_async_scheduling_keeps_its_overlap_and_the_same_output(qwen2_checkpoint, json_texts):
    """Each step's bitmask is filled while its forward runs, once the step before has landed there."""
    ahead = LLM(qwen2_checkpoint, async_scheduling=True, **ENGINE)
    engine, overlapped = ahead.engine, 0
    before_sample = engine._before_sample

    def counted(step, outputs):
        nonlocal overlapped
        overlapped += engine.in_flight is not None
        before_sample(step, outputs)

    engine._before_sample = counted
    assert texts(ahead, constrained(json=SCHEMA)) == json_texts
    assert overlapped > 10


def test_a_runner_in_another_process_reads_the_bitmask_off_the_wire(qwen2_checkpoint, json_texts):
    remote = LLM(qwen2_checkpoint, distributed_executor_backend="mp", device="cpu", **ENGINE)
    assert texts(remote, constrained(json=SCHEMA)) == json_texts


def test_preempted_requests_keep_their_grammar_state(qwen2_checkpoint, json_texts):
    tight = LLM(qwen2_checkpoint, block_size=4, num_gpu_blocks_override=40, max_model_len=160)
    assert texts(tight, constrained(json=SCHEMA)) == json_texts
    assert tight.engine.scheduler.total_preemptions > 0


def test_speculative_decoding_masks_each_draft_and_rolls_back(qwen2_checkpoint, llm):
    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    spec = LLM(qwen2_checkpoint, speculative_config=ngram, **ENGINE)
    drafted = accepted = 0
    step = spec.engine.step

    def counted_step():
        nonlocal drafted, accepted
        outputs = step()
        stats = outputs.scheduler_stats.spec_decoding
        if stats is not None:
            drafted += stats.num_draft_tokens
            accepted += stats.num_accepted_tokens
        return outputs

    spec.engine.step = counted_step
    params = constrained(regex=REGEX)
    assert texts(spec, params) == texts(llm, params)
    assert 0 < accepted < drafted


def test_a_grammar_xgrammar_refuses_runs_on_llguidance(llm):
    lark = 'start: "(" item ("," item)* ")"\nitem: /[0-9]/ | "x"'
    assert all(re.fullmatch(r"\(([0-9]|x)(,([0-9]|x))*\)", t) for t in texts(llm, constrained(grammar=lark)))


def test_invalid_schema_regex_or_grammar_is_refused_before_it_runs(llm):
    for kind in ({"json": {"type": "object", "properties": 3}}, {"regex": "[0-9"}, {"grammar": 'root ::= "a'}):
        with pytest.raises(ValueError, match="invalid structured output"):
            llm.generate(["hi"], constrained(**kind))
    assert not llm.engine.has_requests()


def test_a_grammar_that_fails_in_the_engine_ends_only_its_request(llm):
    """Past the front end's check (here skipped), a compile failure aborts its own request; the others run on."""
    bad = SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(regex="[0-9"))
    llm.engine.add_request(EngineCoreRequest("bad", [5, 6, 7], bad, None, 0.0))
    free = SamplingParams(max_tokens=4, ignore_eos=True)
    llm.engine.add_request(EngineCoreRequest("good", [5, 6, 7], free, None, 0.0))
    finished = {}
    while llm.engine.has_requests():
        finished.update({o.request_id: o.finish_reason for o in llm.engine.step().outputs if o.finish_reason})
    assert finished == {"bad": "abort", "good": "length"}

"""Structured output after reasoning (a `--reasoning-parser`'s `</think>`, as vLLM does it): the grammar leaves the
output free until the reasoning-end tokens appear, then constrains what follows them. Random weights choose no
particular token, so `logit_bias` makes them: a large bias on a token the grammar forbids shows the mask is off
while reasoning, a large bias on the end token ends reasoning at once."""

from __future__ import annotations

import json

import jsonschema
import pytest

from loomserve import LLM, SamplingParams
from loomserve.api.reasoning import REASONING_PARSERS
from loomserve.platform.structured import StructuredOutputsParams
from loomserve.platform.structured.scheduling import reasoning_end

SCHEMA = {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm(qwen2_checkpoint) -> LLM:
    return LLM(qwen2_checkpoint, block_size=4, kv_cache_memory="32MiB")


def token(llm: LLM, text: str) -> int:
    (token_id,) = llm.get_tokenizer().encode(text, add_special_tokens=False)
    return token_id


def after_reasoning(end: list[int], bias: dict[int, float], max_tokens: int = 40) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, logit_bias=bias, structured_outputs=
                          StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True,
                                                  reasoning_end_token_ids=end))


def test_the_output_is_free_until_reasoning_ends(llm):
    end, free = token(llm, "Z"), token(llm, "Q")  # "Q" cannot open a JSON object
    (output,) = llm.generate(["Think first."], after_reasoning([end], {free: 100, end: -100}, max_tokens=12))
    assert output.outputs[0].token_ids == [free] * 12


def test_the_grammar_applies_from_the_token_after_the_end(llm):
    end = token(llm, "Z")  # biased to come first; the schema's JSON never contains it, so it ends reasoning once
    (output,) = llm.generate(["Think first."], after_reasoning([end], {end: 100}))
    ids = output.outputs[0].token_ids
    assert ids[0] == end and end not in ids[1:]
    text = output.outputs[0].text
    assert text.startswith("Z")
    jsonschema.validate(json.loads(text[1:]), SCHEMA)


def test_without_reasoning_the_grammar_applies_from_the_first_token(llm):
    end = token(llm, "Z")
    (output,) = llm.generate(["Think first."], after_reasoning(None, {end: 100}))
    jsonschema.validate(json.loads(output.outputs[0].text), SCHEMA)


def test_an_end_sequence_is_found_across_steps_and_only_once_whole():
    end = [7, 8, 9]
    assert reasoning_end([1, 7, 8], end, 0) is None
    assert reasoning_end([1, 7, 8, 9, 4], end, 3) == 4  # tokens up to 3 were searched; the sequence straddles it
    assert reasoning_end([7, 8, 9, 7, 8, 9], end, 0) == 3
    assert reasoning_end([7, 8, 9], end, 3) is None  # found before: the caller moved past it


def test_the_reasoning_parser_waits_for_its_end_unless_the_prompt_closed_it(llm):
    tokenizer = llm.get_tokenizer()
    parser = REASONING_PARSERS["qwen3"]()
    end = tokenizer.encode("</think>", add_special_tokens=False)
    assert parser.end_token_ids(tokenizer, tokenizer.encode("user: hi\nassistant: <think>")) == end
    assert parser.end_token_ids(tokenizer, tokenizer.encode("user: hi\nassistant:")) == end
    assert parser.end_token_ids(tokenizer, tokenizer.encode("assistant: <think>\n\n</think>\n\n")) is None

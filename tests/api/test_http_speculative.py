"""A server started with --speculative-config (vLLM's JSON flag) serves the same greedy text as the offline engine
and counts its drafts in vLLM's spec_decode metric families."""

from __future__ import annotations

import json

from loomserve import LLM, SamplingParams

PROMPT = "hello world hello world hello world hello"
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


def test_a_speculating_server_answers_as_the_engine_and_counts_drafts(start_server, qwen2_checkpoint):
    expected = LLM(qwen2_checkpoint, kv_cache_memory="16MiB").generate(
        PROMPT, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[0].outputs[0].text
    with start_server("--speculative-config", json.dumps(NGRAM)) as server:
        answer = server.client().completions.create(model=server.model, prompt=PROMPT, max_tokens=24,
                                                    temperature=0.0, extra_body={"ignore_eos": True})
        drafted = server.metric("loomserve:spec_decode_num_draft_tokens_total")
        accepted = server.metric("loomserve:spec_decode_num_accepted_tokens_total")
        per_position = [server.metric("loomserve:spec_decode_num_accepted_tokens_per_pos_total", position=str(i))
                        for i in range(NGRAM["num_speculative_tokens"])]
        assert server.metric("loomserve:spec_decode_num_drafts_total") > 0
    assert answer.choices[0].text == expected
    assert 0 < accepted < drafted
    assert sum(per_position) == accepted and per_position == sorted(per_position, reverse=True)

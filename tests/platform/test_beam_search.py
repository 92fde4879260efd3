"""Beam search over the engine (vLLM v1's algorithm): equal to transformers' `num_beams` search token for token where
the two algorithms agree (no beam ends: transformers without an eos id, ours with ignore_eos; the candidates, the beams
kept and the final ranking are then the same), and vLLM's rules where a beam ends."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from loomserve import LLM, BeamSearchParams
from loomserve.platform.beam_search import BeamSearch, beam_score
from loomserve.platform.request import Logprob

PROMPTS = ["the cat sat on the mat", "hello world, how are"]
EOS = 99


@pytest.fixture(scope="module")
def llm(qwen2_checkpoint) -> LLM:
    return LLM(qwen2_checkpoint, block_size=4, kv_cache_memory="32MiB")


@pytest.mark.parametrize(("width", "length_penalty", "early_stopping"), [(3, 0.5, True), (2, 1.0, False)])
def test_beams_equal_transformers_num_beams(llm, qwen2_checkpoint, width, length_penalty, early_stopping):
    model = AutoModelForCausalLM.from_pretrained(qwen2_checkpoint, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    params = BeamSearchParams(beam_width=width, max_tokens=6, ignore_eos=True, length_penalty=length_penalty,
                              early_stopping=early_stopping)
    outputs = llm.beam_search([{"prompt": p} for p in PROMPTS], params)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        ids = llm.get_tokenizer()(prompt, return_tensors="pt").input_ids
        expected = model.generate(ids, num_beams=width, num_return_sequences=width, do_sample=False, max_new_tokens=6,
                                  length_penalty=length_penalty, early_stopping=early_stopping, pad_token_id=0,
                                  output_scores=True, return_dict_in_generate=True)
        assert [s.tokens for s in output.sequences] == expected.sequences.tolist()
        cum_logprobs = expected.sequences_scores * 6**length_penalty  # transformers normalizes by new tokens only
        assert [s.cum_logprob for s in output.sequences] == pytest.approx(cum_logprobs.tolist(), abs=1e-4)
        assert all(s.finish_reason == "length" for s in output.sequences)


def test_text_is_the_whole_sequence_decoded(llm):
    [output] = llm.beam_search("the cat sat", BeamSearchParams(beam_width=2, max_tokens=3, ignore_eos=True))
    for sequence in output.sequences:
        assert sequence.text == llm.get_tokenizer().decode(sequence.tokens, skip_special_tokens=True)
        assert len(sequence.logprobs) == 3


def candidates(*pairs: tuple[int, float]) -> dict[int, Logprob]:
    return {token: Logprob(logprob, rank) for rank, (token, logprob) in enumerate(pairs, start=1)}


def test_a_candidate_ending_in_eos_completes_and_the_rest_run_on():
    search = BeamSearch([1, 2], BeamSearchParams(beam_width=2, max_tokens=4), EOS, max_model_len=64)
    search.advance([candidates((EOS, -0.1), (5, -1.0), (6, -2.0), (7, -3.0))])
    assert [b.tokens for b in search.completed] == [[1, 2, EOS]] and search.completed[0].finish_reason == "stop"
    assert [b.tokens for b in search.running] == [[1, 2, 5], [1, 2, 6]]


def test_ignore_eos_keeps_eos_candidates_running():
    search = BeamSearch([1], BeamSearchParams(beam_width=2, max_tokens=4, ignore_eos=True), EOS, max_model_len=64)
    search.advance([candidates((EOS, -0.1), (5, -1.0))])
    assert not search.completed and [b.tokens for b in search.running] == [[1, EOS], [1, 5]]


def test_early_stopping_ends_once_beam_width_beams_completed():
    for early_stopping, done in ((True, True), (False, False)):
        search = BeamSearch([1], BeamSearchParams(beam_width=1, max_tokens=4, early_stopping=early_stopping), EOS,
                            max_model_len=64)
        search.advance([candidates((EOS, -3.0), (5, -0.1))])
        assert search.done is done
        if early_stopping:  # what completed is returned, not the better running beam
            assert [b.tokens for b in search.best()] == [[1, EOS]]


def test_max_tokens_ends_the_running_beams_with_length():
    search = BeamSearch([1], BeamSearchParams(beam_width=2, max_tokens=1), EOS, max_model_len=64)
    search.advance([candidates((5, -0.5), (6, -1.0))])
    assert search.done and [b.finish_reason for b in search.best()] == ["length", "length"]


@pytest.mark.parametrize(("length_penalty", "ranked"), [(2.0, [[1, 2, 5, 6], [1, 2, 5, 7]]),
                                                         (0.0, [[1, 2, EOS], [1, 2, 5, 6]])])
def test_length_penalty_ranks_by_vllm_score(length_penalty, ranked):
    """cum_logprob / len ** length_penalty over prompt and output tokens, a final eos not counted."""
    params = BeamSearchParams(beam_width=2, max_tokens=2, length_penalty=length_penalty)
    search = BeamSearch([1, 2], params, EOS, max_model_len=64)
    search.advance([candidates((EOS, -1.0), (5, -0.7))])  # [1, 2, EOS]: -1 / 2**2; [1, 2, 5]: -0.7 / 3**2
    search.advance([candidates((6, -0.6), (7, -0.9))])  # [1, 2, 5, 6]: -1.3 / 4**2
    best = search.best()
    assert [b.tokens for b in best] == ranked
    assert beam_score([1, 2, EOS], -1.0, EOS, 2.0) == pytest.approx(-0.25)
    assert beam_score([1, 2, 5, 6], -1.3, EOS, 2.0) == pytest.approx(-1.3 / 16)

"""Greedy output with speculative decoding is token-identical to the engine without it (itself equal to
transformers, test_engine_greedy.py), whatever the proposer, family, budget, cache state or memory pressure; and
every such run both accepts and rejects drafts, so the rollback is exercised."""

from __future__ import annotations

import functools

import pytest

from loomserve import LLM, SamplingParams
from loomserve.testing.checkpoints import tiny_checkpoint

PROMPTS = [  # repetitive enough that the tiny random models of every family accept some n-gram drafts
    "hello world hello world hello world hello",
    "1 2 3 1 2 3 1 2 3 1 2",
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
ENGINE = {"block_size": 4, "kv_cache_memory": "32MiB"}


@functools.cache
def without_speculation(path: str, max_tokens: int = GREEDY.max_tokens) -> list[list[int]]:
    llm = LLM(path, **ENGINE)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]


class Counted:
    """An LLM whose engine steps' speculative-decoding stats are summed (drafted, accepted)."""

    def __init__(self, path: str, **engine) -> None:
        self.llm = LLM(path, **{**ENGINE, **engine})
        self.drafted = self.accepted = 0
        step = self.llm.engine.step

        def counted_step():
            outputs = step()
            stats = outputs.scheduler_stats.spec_decoding
            if stats is not None:
                self.drafted += stats.num_draft_tokens
                self.accepted += stats.num_accepted_tokens
            return outputs

        self.llm.engine.step = counted_step

    def generate(self, prompts=PROMPTS, params=GREEDY) -> list[list[int]]:
        return [o.outputs[0].token_ids for o in self.llm.generate(prompts, params)]

    def assert_accepted_and_rejected(self) -> None:
        assert 0 < self.accepted < self.drafted


def test_ngram_greedy_equals_no_speculation(family_checkpoint):
    _, path = family_checkpoint
    llm = Counted(path, speculative_config=NGRAM)
    assert llm.generate() == without_speculation(path)
    llm.assert_accepted_and_rejected()


def test_ngram_with_chunked_prefill_and_a_budget_that_cuts_drafts(qwen2_checkpoint):
    llm = Counted(qwen2_checkpoint, speculative_config=NGRAM, max_num_batched_tokens=6)
    assert llm.generate() == without_speculation(qwen2_checkpoint)
    llm.assert_accepted_and_rejected()


def test_prefix_cache_hits_keep_speculative_output_equal(qwen2_checkpoint):
    llm = Counted(qwen2_checkpoint, speculative_config=NGRAM)
    llm.generate()
    again = llm.llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in again] == without_speculation(qwen2_checkpoint)
    assert again[0].num_cached_tokens >= 16


def test_forced_preemption_with_speculation_resumes_with_unchanged_output(qwen2_checkpoint):
    llm = Counted(qwen2_checkpoint, speculative_config=NGRAM, num_gpu_blocks_override=24, max_model_len=96)
    assert llm.generate() == without_speculation(qwen2_checkpoint)
    assert llm.llm.engine.scheduler.total_preemptions > 0
    assert llm.llm.engine.scheduler.kv.pool.num_free_blocks == 24


def test_async_scheduling_with_speculation_equals_no_speculation(qwen2_checkpoint):
    llm = Counted(qwen2_checkpoint, speculative_config=NGRAM, async_scheduling=True)
    assert llm.generate() == without_speculation(qwen2_checkpoint)
    llm.assert_accepted_and_rejected()


def test_a_stop_token_among_accepted_drafts_ends_the_output_there(qwen2_checkpoint):
    reference = without_speculation(qwen2_checkpoint)[0]
    stop = reference[10]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop_token_ids=[stop])
    llm = Counted(qwen2_checkpoint, speculative_config=NGRAM)
    assert llm.generate(PROMPTS[:1], params)[0] == reference[: reference.index(stop) + 1]


def test_max_tokens_is_never_overshot_by_accepted_drafts(qwen2_checkpoint):
    llm = Counted(qwen2_checkpoint, speculative_config=NGRAM)
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    assert llm.generate(PROMPTS, params) == without_speculation(qwen2_checkpoint, 5)


def test_a_draft_model_identical_to_the_target_has_every_draft_accepted(qwen2_checkpoint):
    spec = {"method": "draft_model", "model": qwen2_checkpoint, "num_speculative_tokens": 3}
    llm = Counted(qwen2_checkpoint, speculative_config=spec)
    assert llm.generate() == without_speculation(qwen2_checkpoint)
    assert llm.accepted == llm.drafted > 0  # the draft's KV follows the target's exactly


@pytest.mark.parametrize("engine", [{}, {"max_num_batched_tokens": 8, "num_gpu_blocks_override": 40,
                                         "max_model_len": 96}])
def test_a_differing_draft_model_keeps_greedy_output_equal(qwen2_checkpoint, engine):
    draft = str(tiny_checkpoint("qwen2", seed=1, num_layers=1))
    spec = {"method": "draft_model", "model": draft, "num_speculative_tokens": 3}
    llm = Counted(qwen2_checkpoint, speculative_config=spec, **engine)
    assert llm.generate() == without_speculation(qwen2_checkpoint)
    assert llm.drafted > 0


def test_large_batches_do_not_speculate(qwen2_checkpoint):
    llm = Counted(qwen2_checkpoint, speculative_config={**NGRAM, "disable_by_batch_size": 2})
    short = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.generate(PROMPTS[:2], short)
    assert llm.drafted == 0  # two requests ran in every step
    outputs = llm.generate(PROMPTS[:2], [GREEDY, short])
    assert outputs[0] == without_speculation(qwen2_checkpoint)[0]
    assert llm.drafted > 0  # once the short request is done, the long one speculates

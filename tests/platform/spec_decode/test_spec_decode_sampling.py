"""Sampled output with speculative decoding keeps the target's distribution: over many samples with a draft model
that differs from the target, or an EAGLE-3 head, the frequencies of whole continuations match their exact
probabilities under the target (transformers), by a chi-square test."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from test_spec_decode_greedy import Counted
from transformers import AutoModelForCausalLM, AutoTokenizer

from loomserve import SamplingParams
from loomserve.testing.checkpoints import tiny_checkpoint
from loomserve.testing.eagle3_checkpoints import tiny_eagle3_head

PROMPT = "hello world"
LENGTH, TOP_K, SAMPLES = 4, 2, 500
CHI2_LIMIT = 45.0  # at most 15 degrees of freedom: p < 1e-4


def continuation_probs(path: str) -> dict[tuple[int, ...], float]:
    """Every continuation of LENGTH tokens the target can sample (top-k at temperature 1) with its probability."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompt = tokenizer(PROMPT).input_ids
    probs = {(): 1.0}
    for _ in range(LENGTH):
        grown = {}
        for prefix, p in probs.items():
            with torch.no_grad():
                logits = model(torch.tensor([prompt + list(prefix)])).logits[0, -1]
            top = logits.topk(TOP_K)
            for token, q in zip(top.indices.tolist(), top.values.softmax(dim=-1).tolist()):
                grown[prefix + (token,)] = p * q
        probs = grown
    return probs


def drafter(method: str, target: str, exact: dict[tuple[int, ...], float]) -> str:
    if method == "draft_model":
        return str(tiny_checkpoint("qwen2", num_layers=1))  # the target's seed, one layer: close, not equal
    # A random head whose draft vocabulary is what the target can emit here (EAGLE-3 takes its target's frequent
    # tokens), so some of its drafts are accepted.
    support = sorted({token for seq in exact for token in seq})
    return str(tiny_eagle3_head(target, aux_layer_ids=[1, 0, 1], draft_token_ids=support))


@pytest.mark.parametrize("method", ["draft_model", "eagle3"])
def test_sampled_continuations_follow_the_target_with_a_differing_drafter(qwen2_checkpoint, method):
    exact = continuation_probs(qwen2_checkpoint)
    spec = {"method": method, "model": drafter(method, qwen2_checkpoint, exact), "num_speculative_tokens": 3}
    llm = Counted(qwen2_checkpoint, speculative_config=spec)
    params = SamplingParams(temperature=1.0, top_k=TOP_K, max_tokens=LENGTH, ignore_eos=True)
    counts = Counter(map(tuple, llm.generate([PROMPT] * SAMPLES, params)))
    assert set(counts) <= set(exact), "a continuation the target cannot sample was emitted"
    # Continuations expected fewer than 5 times share one bin, as the chi-square approximation needs.
    bins: dict[object, list[float]] = {}
    for seq, p in exact.items():
        key = seq if p * SAMPLES >= 5 else "rare"
        observed, expected = bins.setdefault(key, [0.0, 0.0])
        bins[key] = [observed + counts[seq], expected + p * SAMPLES]
    chi2 = sum((o - e) ** 2 / e for o, e in bins.values())
    print(f"chi2 {chi2:.1f} over {len(bins)} bins; drafts accepted {llm.accepted} of {llm.drafted}")
    assert chi2 < CHI2_LIMIT
    assert 0 < llm.accepted < llm.drafted  # both the acceptance and the recovery paths ran

"""What the KV-transfer tests share: a multi-turn workload of long shared prefixes and transformers' greedy answers."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loomserve import SamplingParams

MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
# Four conversations of ~37 tokens each (~10 blocks of 4): together well over a 16-block device pool.
PREFIXES = [" ".join(f"w{p}x{i}" for i in range(8)) for p in range(4)]
FIRST_TURNS = [p + " question one" for p in PREFIXES]
SECOND_TURNS = [p + " question two" for p in PREFIXES]


@functools.cache
def _greedy(path: str, prompts: tuple[str, ...], max_tokens: int) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        out.append(gen[0, ids.shape[1] :].tolist())
    return out


@pytest.fixture(scope="session")
def greedy_reference(qwen2_checkpoint):
    """transformers' greedy continuations of prompts, one at a time, on the tiny qwen2."""
    return lambda prompts, max_tokens=MAX_TOKENS: _greedy(qwen2_checkpoint, tuple(prompts), max_tokens)

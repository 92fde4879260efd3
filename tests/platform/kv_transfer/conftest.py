"""What the KV-transfer tests share: transformers' greedy answers."""

from __future__ import annotations

import functools

import pytest
import torch
from kv_workload import MAX_TOKENS
from transformers import AutoModelForCausalLM, AutoTokenizer


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

"""Each MoE family (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE), loaded from per-expert checkpoint tensors, computes
transformers' logits over packed batches and decodes its greedy tokens."""

from __future__ import annotations

import functools

import pytest
import torch
from paged_batch import PagedRunner, load

from loomserve import LLM, SamplingParams
from loomserve.testing.moe_checkpoints import MOE_FAMILIES, tiny_moe_checkpoint

TOLERANCE = 1e-5  # max |ours - transformers| / max |transformers| over a sequence's logits
PROMPTS = ["hello world", "the cat sat on the mat and then it", "café naïve 日本語 and some more words"]
MAX_TOKENS = 8


@functools.cache
def reference_model(family: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    path = tiny_moe_checkpoint(family)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


@functools.cache
def reference_greedy(family: str) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_moe_checkpoint(family))
    out = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        gen = reference_model(family).generate(ids, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                                               do_sample=False)
        out.append(gen[0, ids.shape[1] :].tolist())
    return out


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_packed_prefill_matches_transformers(family: str) -> None:
    reference, ours = reference_model(family), load(tiny_moe_checkpoint(family))
    generator = torch.Generator().manual_seed(0)
    prompts = {f"p{n}": torch.randint(reference.config.vocab_size, (n,), generator=generator).tolist()
               for n in (5, 17, 33)}
    logits = PagedRunner(ours, block_size=16).step(prompts)
    for seq, tokens in prompts.items():
        with torch.inference_mode():
            expected = reference(torch.tensor([tokens])).logits[0]
        assert ((logits[seq] - expected).abs().max() / expected.abs().max()).item() < TOLERANCE, seq


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])  # dense and sparse layers; always renormalised
def test_greedy_batch_equals_transformers(family: str) -> None:
    llm = LLM(str(tiny_moe_checkpoint(family)), block_size=4, kv_cache_memory="16MiB", max_num_batched_tokens=16)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)] == reference_greedy(family)

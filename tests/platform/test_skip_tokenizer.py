"""`skip_tokenizer_init` (vLLM's --skip-tokenizer-init): an engine over a checkpoint with no tokenizer files takes
token ids, generates what transformers generates from them, and answers no text; what needs a tokenizer is
refused saying so."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from loomserve import LLM, SamplingParams

PROMPT_IDS = [12, 7, 99, 41, 3, 250, 18, 64]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def without_tokenizer(qwen2_checkpoint, tmp_path_factory) -> str:
    """The tiny qwen2 checkpoint without its tokenizer files (config, generation config and weights only)."""
    folder = tmp_path_factory.mktemp("no_tokenizer")
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(f"{qwen2_checkpoint}/{name}", folder / name)
    return str(folder)


@pytest.fixture(scope="module")
def llm(without_tokenizer) -> LLM:
    return LLM(without_tokenizer, block_size=4, kv_cache_memory="16MiB", skip_tokenizer_init=True)


def test_token_ids_in_token_ids_out_as_transformers_generates(llm, without_tokenizer):
    [out] = llm.generate([{"prompt_token_ids": PROMPT_IDS}], GREEDY)
    hf = AutoModelForCausalLM.from_pretrained(without_tokenizer, dtype=torch.float32)
    expected = hf.generate(torch.tensor([PROMPT_IDS]), attention_mask=torch.ones(1, len(PROMPT_IDS)).long(),
                           max_new_tokens=10, min_new_tokens=10, do_sample=False)[0, len(PROMPT_IDS):].tolist()
    assert out.outputs[0].token_ids == expected
    assert out.outputs[0].text == ""


@pytest.mark.parametrize("call, what", [
    (lambda llm: llm.generate("hello there", GREEDY), "a text prompt"),
    (lambda llm: llm.chat([{"role": "user", "content": "hi"}], GREEDY), "chat messages"),
    (lambda llm: llm.generate([PROMPT_IDS], SamplingParams(max_tokens=4, stop=["."])), "`stop`"),
    (lambda llm: llm.generate([PROMPT_IDS], SamplingParams(max_tokens=4, bad_words=["no"])), "`bad_words`"),
], ids=["text", "chat", "stop strings", "bad words"])
def test_what_needs_the_tokenizer_is_refused(llm, call, what):
    with pytest.raises(ValueError, match=f"{what}.*--skip-tokenizer-init"):
        call(llm)

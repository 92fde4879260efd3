"""What the quantization tests compare: the engine's logits over a prompt (paged, one step) and transformers' over the
same prompt, float32 on CPU."""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parents[1]))  # paged_batch, beside the platform tests
from paged_batch import PagedRunner, load, model_config  # noqa: E402

__all__ = ["PROMPT_IDS", "engine_logits", "load", "model_config", "transformers_logits"]

PROMPT_IDS = list(range(3, 40))


def engine_logits(model: torch.nn.Module) -> torch.Tensor:
    return PagedRunner(model, block_size=16).step({"s": PROMPT_IDS})["s"]  # [n, V]


@cache
def transformers_logits(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([PROMPT_IDS])).logits[0]  # [n, V]

"""INT4 GPTQ and AWQ checkpoints in their packers' layouts: the engine reads the packing back and computes what
transformers computes with the dense weights the checkpoint encodes (transformers runs neither format on a CPU).
Tolerance: 1e-4 on float32 logits (the same weights; only the order of float sums differs)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from loomserve.platform.quantization.int4 import Int4Linear
from loomserve.testing.int4_checkpoints import tiny_int4

sys.path.insert(0, str(Path(__file__).parents[1]))  # paged_batch, beside the platform tests
from paged_batch import PagedRunner, load, model_config  # noqa: E402

PROMPT_IDS = list(range(3, 40))


@pytest.mark.parametrize(("method", "group_size", "act_order"), [
    ("gptq", 32, False), ("gptq", 128, True), ("awq", 64, False), ("awq", 128, False)])
def test_int4_logits_match_transformers_on_the_encoded_weights(method: str, group_size: int, act_order: bool) -> None:
    quantized, dense = tiny_int4(method, group_size, act_order)
    model = load(quantized)
    assert isinstance(model.model.layers[0].mlp.gate_up_proj, Int4Linear)
    logits = PagedRunner(model, block_size=16).step({"s": PROMPT_IDS})["s"]
    reference = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([PROMPT_IDS])).logits[0]
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)


def test_int4_method_comes_from_the_checkpoint_and_the_flag_may_confirm_it() -> None:
    quantized, _ = tiny_int4("awq", 64)
    assert model_config(quantized, quantization="awq").quantization == "awq"
    with pytest.raises(ValueError, match="quantized with awq, not gptq"):
        model_config(quantized, quantization="gptq")

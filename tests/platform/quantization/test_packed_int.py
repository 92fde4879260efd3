"""Weight-only INT4 / INT8 compressed-tensors checkpoints (`pack-quantized`, llm-compressor's W4A16 and W8A16),
written by compressed-tensors' own tools: the engine's logits equal transformers' on the same checkpoint within 1e-4
(float32; the same dequantized weights, float sums in another order)."""

from __future__ import annotations

import pytest
import torch
from quant_reference import engine_logits, load, transformers_logits

from loomserve.platform.quantization.base import DequantizedLinear
from loomserve.testing.quantized_checkpoints import tiny_compressed_tensors


@pytest.mark.parametrize("preset", ["W4A16", "W8A16"])
def test_weight_only_logits_match_transformers(preset: str) -> None:
    folder = tiny_compressed_tensors(preset)
    model = load(folder)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, DequantizedLinear)
    torch.testing.assert_close(engine_logits(model), transformers_logits(folder), rtol=0, atol=1e-4)

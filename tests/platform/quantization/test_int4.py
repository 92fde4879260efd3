"""INT4 GPTQ and AWQ checkpoints in their packers' layouts: the engine reads the packing back and computes what
transformers computes with the dense weights the checkpoint encodes (transformers runs neither format on a CPU).
Tolerance: 1e-4 on float32 logits (the same weights; only the order of float sums differs)."""

from __future__ import annotations

import pytest
import torch
from quant_reference import engine_logits, load, model_config, transformers_logits

from loomserve.platform.quantization.base import DequantizedLinear
from loomserve.testing.int4_checkpoints import tiny_int4


@pytest.mark.parametrize(("method", "group_size", "act_order"), [
    ("gptq", 32, False), ("gptq", 128, True), ("awq", 64, False), ("awq", 128, False)])
def test_int4_logits_match_transformers_on_the_encoded_weights(method: str, group_size: int, act_order: bool) -> None:
    quantized, dense = tiny_int4(method, group_size, act_order)
    model = load(quantized)
    assert isinstance(model.model.layers[0].mlp.gate_up_proj, DequantizedLinear)
    torch.testing.assert_close(engine_logits(model), transformers_logits(dense), rtol=0, atol=1e-4)


def test_int4_method_comes_from_the_checkpoint_and_the_flag_may_confirm_it() -> None:
    quantized, _ = tiny_int4("awq", 64)
    assert model_config(quantized, quantization="awq").quantization == "awq"
    with pytest.raises(ValueError, match="quantized with awq, not gptq"):
        model_config(quantized, quantization="gptq")


@pytest.mark.parametrize(("method", "group_size", "act_order"), [("gptq", 128, True), ("awq", 64, False)])
@pytest.mark.parametrize(("tokens", "split_k"), [(5, True), (40, False)])
def test_triton_kernel_equals_the_dequantized_gemm(method: str, group_size: int, act_order: bool, tokens: int,
                                                   split_k: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA path's kernel (Triton's CPU interpreter here) multiplies straight from the packed weights, act-order
    rows included, with K split across programs (small batches) and without."""
    pytest.importorskip("triton")
    from loomserve.platform.quantization import int4_triton

    if not split_k:
        monkeypatch.setattr(int4_triton, "_TARGET_PROGRAMS", 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layer = load(tiny_int4(method, group_size, act_order)[0]).model.layers[0].mlp.gate_up_proj.to(device)
    shard = layer.shards[0]
    assert (shard.perm is not None) == act_order
    x = torch.randn(tokens, layer.in_features, generator=torch.Generator().manual_seed(0)).to(device)
    expected = x @ shard.dequantize().t()
    tolerance = 1e-4 if device == "cpu" else 2e-2  # TF32 tensor cores on CUDA
    torch.testing.assert_close(shard.matmul(x), expected, rtol=0, atol=tolerance)

"""W8A8, FP8 and INT8: compressed-tensors checkpoints (written by compressed-tensors' own tools), the block-scaled `fp8`
format, and a dense checkpoint quantized at load (`--quantization fp8`). On CPU the layers run the dequantizing
reference, which must compute what transformers computes for the same checkpoint: activations through FP8 and back,
times the dequantized weights. Tolerance: 1e-4 on float32 logits (the same float ops in another order)."""

from __future__ import annotations

import pytest
import torch
from quant_reference import PROMPT_IDS, engine_logits, load, model_config, transformers_logits
from transformers import AutoModelForCausalLM

from loomserve import LLM, SamplingParams
from loomserve.platform.quantization.w8a8 import W8Linear
from loomserve.testing.checkpoints import tiny_checkpoint
from loomserve.testing.quantized_checkpoints import SHAPE, tiny_block_fp8, tiny_compressed_tensors


@pytest.mark.parametrize(("preset", "dtype"), [("FP8", torch.float8_e4m3fn), ("FP8_DYNAMIC", torch.float8_e4m3fn),
                                               ("FP8_BLOCK", torch.float8_e4m3fn), ("W8A8", torch.int8)])
def test_compressed_tensors_w8a8_logits_match_transformers(preset: str, dtype: torch.dtype) -> None:
    """FP8 per-tensor weights with static activation scales, per-channel with per-token, 128x128 blocks with
    per-group activations; INT8 per-channel weights with per-token activations."""
    folder = tiny_compressed_tensors(preset)
    model = load(folder)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, W8Linear)
    assert model.model.layers[0].self_attn.qkv_proj.weight.dtype == dtype
    torch.testing.assert_close(engine_logits(model), transformers_logits(folder), rtol=0, atol=1e-4)


def test_fp8_differs_from_the_dense_model_it_came_from() -> None:
    """The quantization is real: the FP8 model's logits are not the dense checkpoint's."""
    dense = engine_logits(load(tiny_checkpoint("llama", **SHAPE)))
    assert (engine_logits(load(tiny_compressed_tensors("FP8_DYNAMIC"))) - dense).abs().max() > 1e-2


def test_block_fp8_format_matches_the_same_weights_in_compressed_tensors() -> None:
    """`quant_method: fp8` with `weight_block_size` (transformers runs it only on a GPU): the same FP8 weights and
    block scales as the compressed-tensors FP8_BLOCK checkpoint, which transformers runs."""
    assert model_config(tiny_block_fp8()).quantization == "fp8"
    torch.testing.assert_close(engine_logits(load(tiny_block_fp8())),
                               transformers_logits(tiny_compressed_tensors("FP8_BLOCK")), rtol=0, atol=1e-4)


def test_quantize_at_load_equals_compressed_tensors_fp8_dynamic() -> None:
    """--quantization fp8 on the dense checkpoint: per-channel weight scales and per-token activations, as
    compressed-tensors' FP8_DYNAMIC scheme quantizes the same weights."""
    model = load(tiny_checkpoint("llama", **SHAPE), quantization="fp8")
    torch.testing.assert_close(engine_logits(model), transformers_logits(tiny_compressed_tensors("FP8_DYNAMIC")),
                               rtol=0, atol=1e-4)


def test_greedy_generation_equals_transformers() -> None:
    folder = tiny_compressed_tensors("FP8_DYNAMIC")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    expected = hf.generate(torch.tensor([PROMPT_IDS]), max_new_tokens=12, do_sample=False,
                           eos_token_id=None)[0, len(PROMPT_IDS):].tolist()
    llm = LLM(str(folder), device="cpu", kv_cache_memory="16MiB")
    out = llm.generate([{"prompt_token_ids": PROMPT_IDS}], SamplingParams(max_tokens=12, temperature=0,
                                                                          ignore_eos=True))
    assert out[0].outputs[0].token_ids == expected


def test_quantization_flag_must_match_the_checkpoint() -> None:
    with pytest.raises(ValueError, match="quantized with compressed-tensors, not fp8"):
        model_config(tiny_compressed_tensors("FP8_DYNAMIC"), quantization="fp8")


def test_unsupported_compressed_tensors_scheme_is_named() -> None:
    with pytest.raises(ValueError, match=r"int 4-bit \(symmetric=False\) are not supported yet"):
        model_config(tiny_compressed_tensors("W4A16_ASYM"))


def test_scaled_mm_path_computes_the_reference_within_bfloat16_rounding() -> None:
    """The FP8 tensor-core path's arguments (row-scaled `torch._scaled_mm`), run where torch has it on the CPU, give
    the reference's output up to its bfloat16 result."""
    torch.manual_seed(0)
    layer = W8Linear.from_dense(torch.nn.Linear(256, 384, bias=True))
    x = torch.randn(5, 256)
    try:
        fast = layer._scaled_mm(x)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"torch {torch.__version__} has no CPU _scaled_mm: {e}")
    torch.testing.assert_close(fast, layer(x), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("width", [256, 300])
def test_fused_per_token_quantization_equals_the_torch_reference(width: int) -> None:
    """The one-pass Triton kernel the FP8 tensor-core path uses gives the same FP8 values and scales as the torch
    chain it replaces (absmax per row / 448, divide, clamp, cast), zero rows included."""
    pytest.importorskip("triton")
    from loomserve.platform.quantization.fp8_triton import per_token_fp8
    from loomserve.platform.quantization.w8a8 import absmax_scale, quantize

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(6, width, device=device) * torch.tensor([1.0, 1e-3, 30.0, 0.0, 1.0, 5.0], device=device)[:, None]
    q, scale = per_token_fp8(x)
    expected_scale = absmax_scale(x.abs().amax(dim=-1, keepdim=True))
    torch.testing.assert_close(scale, expected_scale)
    expected = quantize(x, expected_scale).float()
    if x.is_cuda:
        torch.testing.assert_close(q.float(), expected)
    else:  # Triton's interpreter sometimes casts to FP8 without carrying a rounded-up mantissa into the exponent
        carried = (expected.abs().log2() % 1 == 0) & ((x / expected_scale).abs() < expected.abs())
        assert ((q.float() == expected) | carried & (q.float() == expected / 2)).all()

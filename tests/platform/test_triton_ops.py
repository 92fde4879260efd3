"""The fused Triton kernels (RMSNorm with residual, rotary, SiLU-and-mul) equal the torch reference layers.
On CUDA in bf16; without CUDA under Triton's CPU interpreter (see conftest.py) in float32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
from loomserve.platform.models import triton_ops  # noqa: E402
from loomserve.platform.models.layers import RMSNorm  # noqa: E402
from loomserve.platform.models.rope import apply_rotary  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
TOL = {"atol": 2e-2, "rtol": 2e-2} if DTYPE == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))).to(DEVICE, DTYPE)


def test_fused_rms_norm_with_residual_equals_reference():
    norm = RMSNorm(96, 1e-6).to(DEVICE, DTYPE)
    norm.weight.data = randn(96)
    x, residual = randn(7, 96), randn(7, 96)
    out, new_residual = triton_ops.rms_norm(x, norm.weight, norm.eps, residual)
    ref_out, ref_residual = norm._norm(x + residual), x + residual
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(new_residual, ref_residual, **TOL)


def test_fused_rms_norm_without_residual_equals_reference():
    norm = RMSNorm(64, 1e-5).to(DEVICE, DTYPE)
    x = randn(5, 64)
    torch.testing.assert_close(triton_ops.rms_norm(x, norm.weight, norm.eps), norm._norm(x), **TOL)


def test_fused_rotary_rotates_q_and_k_in_place_like_reference():
    q, k = randn(6, 4, 32), randn(6, 2, 32)
    cos_sin = torch.randn(6, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ref_q, ref_k = apply_rotary(q, cos_sin), apply_rotary(k, cos_sin)
    triton_ops.rotary_qk_(q, k, cos_sin)
    torch.testing.assert_close(q, ref_q, **TOL)
    torch.testing.assert_close(k, ref_k, **TOL)


def test_fused_rotary_leaves_dims_past_rotary_dim_alone():
    q, k = randn(3, 2, 32), randn(3, 1, 32)
    cos_sin = torch.randn(3, 16, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    ref_q = apply_rotary(q, cos_sin)
    triton_ops.rotary_qk_(q, k, cos_sin)
    torch.testing.assert_close(q, ref_q, **TOL)


def test_fused_silu_and_mul_equals_reference():
    x = randn(9, 2 * 1500)
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(triton_ops.silu_and_mul(x), F.silu(gate) * up, **TOL)

"""Building blocks of the decoder families: RMSNorm (with fused residual add), SiLU-and-mul, fused linears, and the
one way a decoder calls its projections, which adapted (LoRA) linears need the step's adapter batch for."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from loomserve.platform.models.onednn import WeightPacking, packs

if TYPE_CHECKING:  # platform knows the adapters' data type only, never their behaviour
    from loomserve.adapters.layers import LoRABatch

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def use_fused_kernels(x: torch.Tensor) -> bool:
    """Fused Triton kernels replace chains of small torch ops on CUDA; CPU keeps the torch reference."""
    return x.is_cuda and _HAS_TRITON


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight, as transformers does.

    Given `residual`, first adds it (`x + residual` in the model dtype) and also returns the sum as the new
    residual, which folds a decoder layer's skip connection into its norm.
    """

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if use_fused_kernels(x) and x.dim() == 2 and x.stride(-1) == 1:
            from loomserve.platform.models import triton_ops

            return triton_ops.rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


class SiluAndMul(nn.Module):
    """[..., 2 * d] -> [..., d]: silu(gate) * up, for a fused gate_up projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fused_kernels(x) and x.dim() == 2:
            from loomserve.platform.models import triton_ops

            return triton_ops.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class MergedLinear(nn.Linear):
    """Projections of one input stacked along the output dim (qkv, gate_up), loaded shard by shard."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool) -> None:
        super().__init__(in_features, sum(output_sizes), bias=bias)
        self.output_sizes = output_sizes
        self.packing = WeightPacking()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        return self.packing.linear(x, self.weight, self.bias) if packs(x) else F.linear(x, self.weight, self.bias)

    def num_shards(self, param: nn.Parameter) -> int:
        """Checkpoint tensors that fill `param` (weight or bias): one per projection."""
        return len(self.output_sizes)

    def load_shard(self, param: nn.Parameter, shard_id: int, tensor: torch.Tensor) -> None:
        """Copy one checkpoint projection (weight [out_i, in] or bias [out_i]) into its rows of `param`."""
        start = sum(self.output_sizes[:shard_id])
        rows = param.data.narrow(0, start, self.output_sizes[shard_id])
        copy_checked(rows, tensor)


class AdaptedLinear(nn.Module):
    """A linear layer with per-token adapters on top of its base output (LoRA: `adapters/layers.py`). Which adapter
    each token uses changes every step, so the step's adapter batch comes with the input."""

    def forward(self, x: torch.Tensor, lora: LoRABatch | None) -> torch.Tensor:
        raise NotImplementedError


def project(layer: nn.Module, x: torch.Tensor, lora: LoRABatch | None) -> torch.Tensor:
    """A decoder projection of x [T, in] -> [T, out]: an adapted layer gets the step's adapter batch (None: no token
    uses one), a plain, fused or NF4 linear the input alone."""
    return layer(x, lora) if isinstance(layer, AdaptedLinear) else layer(x)


def copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    """copy_ without broadcasting: a checkpoint tensor of the wrong shape is an error, not a silent expand."""
    if dst.shape != src.shape:
        raise ValueError(f"checkpoint tensor has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src)

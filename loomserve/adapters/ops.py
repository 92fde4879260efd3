"""Batched multi-adapter LoRA: y[t, slice s] += scaling[slot_t, s] * (x[t] A_s[slot_t]^T) B_s[slot_t]^T.

Two implementations of the same function: `lora_torch`, the reference, loops over the step's adapter
segments (tokens grouped by slot) and computes each like peft does, at the adapter's true rank; and the
Triton kernels in `ops_triton.py` (shrink then expand over all segments in two launches), used on CUDA.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from loomserve.adapters.layers import LoRABatch, LoRALinear


def add_lora(y: torch.Tensor, x: torch.Tensor, layer: LoRALinear, batch: LoRABatch, backend: str) -> None:
    """Add the adapters' contributions of one layer to its base output `y` [T, out], in place."""
    if backend == "triton":
        from loomserve.adapters.ops_triton import lora_triton

        max_slice = max(layer.output_sizes)
        lora_triton(y, x, layer.lora_a, layer.lora_b, layer.scaling, layer.slice_offsets, max_slice, layer.max_rank,
                    batch)
    else:
        lora_torch(y, x, layer.lora_a, layer.lora_b, layer.slices, layer.ranks, layer.scalings, layer.max_rank,
                   batch)


def lora_torch(
    y: torch.Tensor,  # [T, out]
    x: torch.Tensor,  # [T, in]
    lora_a: torch.Tensor,  # [slots, n_slices * r_max, in]
    lora_b: torch.Tensor,  # [slots, out, r_max]
    slices: list[tuple[int, int]],  # (first output row, rows) per slice
    ranks: list[list[int]],  # [slots][n_slices] true ranks, 0 = slice not adapted
    scalings: list[list[float]],  # [slots][n_slices]
    r_max: int,
    batch: LoRABatch,
) -> None:
    """The reference: per adapter segment, shrink and expand each adapted slice at its true rank (as peft)."""
    for slot, start, end in batch.segments:
        idx = batch.token_indices[start:end]  # [n]
        xs = x[idx]  # [n, in]
        for s, (offset, size) in enumerate(slices):
            rank = ranks[slot][s]
            if rank == 0:
                continue
            a = lora_a[slot, s * r_max : s * r_max + rank]  # [r, in]
            b = lora_b[slot, offset : offset + size, :rank]  # [size, r]
            delta = (xs @ a.t()) @ b.t() * scalings[slot][s]  # [n, size]
            y[idx, offset : offset + size] += delta

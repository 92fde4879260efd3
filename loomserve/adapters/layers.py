"""LoRA on the model's linear layers: stacked weights for `max_loras` slots, added on top of the base output.

Every linear layer of the decoder (not the lm_head) is wrapped once, at start-up, in a `LoRALinear` whose
buffers hold all slots: A `[slots, n_slices * r_max, in]`, B `[slots, out, r_max]`, zero-padded where an
adapter's rank is below r_max or where it leaves a projection alone. A fused layer (qkv, gate_up) has one
slice per projection: slice s reads rows `s * r_max ...` of A and writes its own rows of B's output.

The step's `LoRABatch` (tokens grouped by slot) rides in the forward's `ForwardBatch` and reaches each layer with
its input (`platform.models.layers.project`); tokens of many adapters and of the base model (slot -1) go through one
forward together. A CUDA graph is captured with a batch derived on the device from `LoRAState.graph_slots`, which
each step then refills.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from loomserve.adapters.lora import LoRATarget, LoRAWeights
from loomserve.adapters.ops import add_lora
from loomserve.adapters.tensor_parallel import full_in_features, full_output_sizes, is_row_parallel, shard_weights
from loomserve.platform.models.layers import AdaptedLinear
from loomserve.platform.models.packing import decoder_linears, projection_names
from loomserve.platform.quantization import QuantizedLinear


@dataclass
class LoRABatch:
    """The step's tokens grouped by adapter slot: segment g holds `token_indices[start_g : start_g + len_g]`,
    all of slot `segment_slots[g]`. Base tokens (slot -1) are in no segment. For the Triton kernels each
    segment is cut into chunks of `block_m` tokens, numbered across segments: segment g owns the chunks
    below `chunk_ends[g]` (a running sum), so one grid axis of `num_chunks` programs covers every token."""

    token_indices: torch.Tensor  # [N] int64: token positions in the batch, grouped by slot
    segment_slots: torch.Tensor  # [G] int32
    segment_starts: torch.Tensor  # [G] int32
    segment_lens: torch.Tensor  # [G] int32
    chunk_ends: torch.Tensor  # [G] int32: running sum of ceil(len_g / block_m)
    block_m: int
    num_chunks: int  # exact, or an upper bound for a CUDA-graph batch
    segments: list[tuple[int, int, int]] | None  # host copy (slot, start, end) for the torch path; None in graphs

    @classmethod
    def build(cls, token_slots: np.ndarray, device: torch.device) -> LoRABatch | None:
        """From each token's slot ([T] ints, -1 = base) on the host: one segment per slot in use, or None when
        no token uses an adapter."""
        order = np.argsort(token_slots, kind="stable")
        sorted_slots = token_slots[order]
        first = int(np.searchsorted(sorted_slots, 0))
        if first == len(sorted_slots):
            return None
        slots, starts, lens = np.unique(sorted_slots[first:], return_index=True, return_counts=True)
        block_m = _block_m(float(lens.mean()))
        chunk_ends = np.cumsum(-(-lens // block_m))
        host = np.concatenate([slots, starts, lens, chunk_ends]).astype(np.int32)
        dev = torch.from_numpy(host).to(device, non_blocking=True).view(4, len(slots))  # one copy for the four
        return cls(
            token_indices=torch.from_numpy(order[first:].astype(np.int64)).to(device, non_blocking=True),
            segment_slots=dev[0],
            segment_starts=dev[1],
            segment_lens=dev[2],
            chunk_ends=dev[3],
            block_m=block_m,
            num_chunks=int(chunk_ends[-1]),
            segments=[(int(s), int(b), int(b + n)) for s, b, n in zip(slots, starts, lens)],
        )

    @classmethod
    def for_graph(cls, token_slots: torch.Tensor, num_slots: int) -> LoRABatch:
        """From each token's slot on the device ([T] int32), with one segment per slot whether used or not and
        no host copies, so a CUDA graph captured over it stays right for whatever slots the buffer holds."""
        sorted_slots, order = torch.sort(token_slots, stable=True)
        slots = torch.arange(num_slots, dtype=torch.int32, device=token_slots.device)
        starts = torch.searchsorted(sorted_slots, slots, out_int32=True)
        lens = torch.searchsorted(sorted_slots, slots, right=True, out_int32=True) - starts
        block_m = _block_m(0)
        chunk_ends = torch.cumsum((lens + block_m - 1) // block_m, 0, dtype=torch.int32)
        # Each segment's last chunk may be partial: at most one chunk per slot beyond the tokens' own.
        num_chunks = -(-token_slots.numel() // block_m) + num_slots
        return cls(order, slots, starts, lens, chunk_ends, block_m, num_chunks, None)


def _block_m(mean_segment_len: float) -> int:
    """Tokens per kernel program: 16 (the smallest tensor-core tile) for decode-sized segments, up to 64 for
    prefill, where larger tiles load each adapter's weights fewer times."""
    return 64 if mean_segment_len >= 128 else 32 if mean_segment_len >= 48 else 16


class LoRAState:
    """What all LoRA layers of one model share for good (never a step's batch): the math backend, and
    `graph_slots` ([max tokens] int32, -1 = base), where CUDA-graph replays read each token's slot from."""

    def __init__(self, backend: str) -> None:
        self.backend = backend  # "torch" or "triton"
        self.graph_slots: torch.Tensor | None = None


class LoRALinear(AdaptedLinear):
    """A base linear layer (dense, fused or quantized) plus the slots' adapters: y = base(x) + scaling * x A^T B^T."""

    def __init__(self, base: nn.Module, output_sizes: list[int], max_loras: int, max_rank: int,
                 state: LoRAState, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.base_layer = base
        self.state = state
        self.in_features = base.in_features
        self.output_sizes = list(output_sizes)
        self.max_rank = max_rank
        offsets = np.cumsum([0, *output_sizes]).tolist()
        self.slices = [(offsets[i], size) for i, size in enumerate(output_sizes)]  # (first output row, rows)
        n = len(output_sizes)
        self.register_buffer("lora_a", torch.zeros(max_loras, n * max_rank, self.in_features, dtype=dtype,
                                                   device=device), persistent=False)
        self.register_buffer("lora_b", torch.zeros(max_loras, offsets[-1], max_rank, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("scaling", torch.zeros(max_loras, n, dtype=torch.float32, device=device),
                             persistent=False)
        self.register_buffer("slice_offsets", torch.tensor(offsets, dtype=torch.int32, device=device),
                             persistent=False)
        # Host copies for the torch path, which slices each adapter to its true rank (no device syncs).
        self.ranks = [[0] * n for _ in range(max_loras)]
        self.scalings = [[0.0] * n for _ in range(max_loras)]

    def set_slot(self, slot: int, weights: dict[int, LoRAWeights]) -> None:
        """Put one adapter's weights for this layer (slice -> weights; absent slices stay zero) into `slot`."""
        r_max = self.max_rank
        weights = shard_weights(self.base_layer, weights)
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        for s, (offset, size) in enumerate(self.slices):
            w = weights.get(s)
            rank, scaling = (w.rank, w.scaling) if w is not None else (0, 0.0)
            if w is not None:
                self.lora_a[slot, s * r_max : s * r_max + rank].copy_(w.a, non_blocking=True)
                self.lora_b[slot, offset : offset + size, :rank].copy_(w.b, non_blocking=True)
            self.ranks[slot][s] = rank
            self.scalings[slot][s] = scaling
        self.scaling[slot].copy_(torch.tensor(self.scalings[slot], dtype=torch.float32), non_blocking=True)

    def forward(self, x: torch.Tensor, lora: LoRABatch | None) -> torch.Tensor:
        if lora is None:
            return self.base_layer(x)
        if is_row_parallel(self.base_layer):  # the LoRA term joins the ranks' partial sums before their all-reduce
            y = self.base_layer.partial(x)  # [T, out]
            add_lora(y, x, self, lora, self.state.backend)
            return self.base_layer.reduce(y)
        y = self.base_layer(x)  # [T, out]
        add_lora(y, x, self, lora, self.state.backend)
        return y


def add_lora_layers(
    model: nn.Module, max_loras: int, max_rank: int, backend: str
) -> tuple[LoRAState, dict[str, LoRALinear], dict[str, LoRATarget]]:
    """Wrap every linear layer inside the decoder layers; returns the shared state, the wrapped layers by
    name, and the adaptable projections by their checkpoint name (fused layers split back into projections;
    a multimodal model's canonical names, see `MultiModalForCausalLM.canonical_name`).
    A multimodal model's vision and audio towers and projector stay as they are (`decoder_linears`)."""
    state = LoRAState(backend)
    layers: dict[str, LoRALinear] = {}
    targets: dict[str, LoRATarget] = {}
    linears = decoder_linears(model, (nn.Linear, QuantizedLinear))
    outermost = [(name, m) for name, m in linears if not any(name.startswith(f"{other}.") for other, _ in linears)]
    for name, module in outermost:  # a quantized layer may hold linears of its own (NF4: bitsandbytes shards)
        weight = next(module.parameters())
        dtype = _compute_dtype(module, weight)
        sizes = list(getattr(module, "output_sizes", [module.out_features]))
        wrapped = LoRALinear(module, sizes, max_loras, max_rank, state, dtype, weight.device)
        parent, leaf = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), leaf, wrapped)
        layers[name] = wrapped
        full_sizes = full_output_sizes(module, sizes)  # adapters are checked against the checkpoint's sizes
        for s, projection in enumerate(projection_names(model, name)):
            targets[projection] = LoRATarget(name, s, full_in_features(module), full_sizes[s])
    return state, layers, targets


def _compute_dtype(module: nn.Module, weight: torch.Tensor) -> torch.dtype:
    """Adapters compute in the layer's dtype (an NF4 layer's compute dtype, not its packed uint8)."""
    return getattr(module, "compute_dtype", None) or weight.dtype

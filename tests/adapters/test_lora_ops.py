"""The batched multi-adapter LoRA op: the torch reference equals a per-token loop over the slots' weights; the
Triton kernels equal the reference (at tiny sizes under Triton's CPU interpreter or on CUDA; on CUDA also
at real sizes, eager and in CUDA-graph form)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loomserve.adapters.layers import LoRABatch
from loomserve.adapters.ops import lora_torch


class SlotWeights:
    """Random stacked adapter weights for `slots` slots over a layer with the given output slices."""

    def __init__(self, slots: int, r_max: int, in_features: int, sizes: list[int], ranks: list[list[int]],
                 dtype: torch.dtype, device: str, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.r_max, self.sizes, self.ranks = r_max, sizes, ranks
        self.offsets = np.cumsum([0, *sizes]).tolist()
        self.slices = [(self.offsets[i], n) for i, n in enumerate(sizes)]
        self.a = torch.zeros(slots, len(sizes) * r_max, in_features)
        self.b = torch.zeros(slots, self.offsets[-1], r_max)
        self.scalings = [[float(x) for x in torch.rand(len(sizes), generator=g) * 2] for _ in range(slots)]
        for slot in range(slots):
            for s, rank in enumerate(ranks[slot]):
                self.a[slot, s * r_max : s * r_max + rank] = torch.randn(rank, in_features, generator=g) / 4
                self.b[slot, self.offsets[s] : self.offsets[s + 1], :rank] = torch.randn(sizes[s], rank, generator=g)
        self.a, self.b = self.a.to(device, dtype), self.b.to(device, dtype)
        self.scaling = torch.tensor(self.scalings, dtype=torch.float32, device=device)
        self.slice_offsets = torch.tensor(self.offsets, dtype=torch.int32, device=device)

    def per_token(self, y: torch.Tensor, x: torch.Tensor, token_slots: np.ndarray) -> torch.Tensor:
        """The definition, one token at a time, in float64."""
        out = y.double().clone()
        for t, slot in enumerate(token_slots):
            if slot < 0:
                continue
            for s, (offset, size) in enumerate(self.slices):
                a = self.a[slot, s * self.r_max : (s + 1) * self.r_max].double()
                b = self.b[slot, offset : offset + size].double()
                out[t, offset : offset + size] += self.scalings[slot][s] * (b @ (a @ x[t].double()))
        return out

    def torch_op(self, y: torch.Tensor, x: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
        y = y.clone()
        lora_torch(y, x, self.a, self.b, self.slices, self.ranks, self.scalings, self.r_max, batch)
        return y


# Three slots over a fused layer of 3 slices: different ranks, slices left alone (rank 0), base tokens (-1).
RANKS = [[8, 0, 16], [4, 4, 4], [16, 16, 0]]
SIZES = [24, 8, 8]


def test_batch_groups_tokens_by_slot_and_leaves_base_tokens_out():
    slots = np.array([2, -1, 0, 2, 2, -1, 0])
    batch = LoRABatch.build(slots, torch.device("cpu"))
    assert batch.segments == [(0, 0, 2), (2, 2, 5)]
    assert batch.token_indices.tolist() == [2, 6, 0, 3, 4]
    assert (batch.block_m, batch.num_chunks, batch.chunk_ends.tolist()) == (16, 2, [1, 2])
    assert (batch.segment_slots.tolist(), batch.segment_starts.tolist(), batch.segment_lens.tolist()) == (
        [0, 2], [0, 2], [2, 3])
    assert LoRABatch.build(np.array([-1, -1]), torch.device("cpu")) is None


def test_graph_batch_groups_the_same_tokens_on_the_device():
    slots = np.array([2, -1, 0, 2, 2, -1, 0])
    batch = LoRABatch.for_graph(torch.from_numpy(slots).to(torch.int32), 4)
    assert batch.segment_slots.tolist() == [0, 1, 2, 3] and batch.segments is None
    assert batch.chunk_ends.tolist() == [1, 1, 2, 2] and batch.num_chunks == 1 + 4
    groups = [batch.token_indices[s : s + n].tolist() for s, n in zip(batch.segment_starts, batch.segment_lens)]
    assert groups == [[2, 6], [], [0, 3, 4], []]


def test_torch_reference_equals_the_per_token_definition():
    w = SlotWeights(3, 16, 40, SIZES, RANKS, torch.float32, "cpu")
    token_slots = np.random.default_rng(0).integers(-1, 3, size=37)
    x, y = torch.randn(37, 40), torch.randn(37, sum(SIZES))
    got = w.torch_op(y, x, LoRABatch.build(token_slots, torch.device("cpu")))
    torch.testing.assert_close(got.double(), w.per_token(y, x, token_slots), rtol=1e-5, atol=1e-4)
    assert torch.equal(got[token_slots < 0], y[token_slots < 0])  # base tokens untouched


@pytest.mark.parametrize("in_features", [40, 300])
@pytest.mark.parametrize("num_tokens", [1, 37, 70])
def test_triton_kernels_equal_the_reference_at_tiny_sizes(num_tokens, in_features):
    """Without CUDA under Triton's CPU interpreter (see conftest.py). Both batch forms: the host-grouped one of
    eager steps, and the device-grouped one CUDA graphs capture (every slot a segment, a grid covering the
    most chunks a batch of its size can have), here 3 slots of 4 with slot 3 unused; 300 inputs make the shrink
    split them."""
    pytest.importorskip("triton")
    from loomserve.adapters.ops_triton import lora_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    w = SlotWeights(3, 16, in_features, SIZES, RANKS, torch.float32, device)
    token_slots = np.random.default_rng(num_tokens).integers(-1, 3, size=num_tokens)
    token_slots[0] = 1
    x = torch.randn(num_tokens, in_features, device=device)
    y = torch.randn(num_tokens, sum(SIZES), device=device)
    batch = LoRABatch.build(token_slots, torch.device(device))
    expected = w.torch_op(y, x, batch)
    graph_batch = LoRABatch.for_graph(torch.from_numpy(token_slots).to(device, torch.int32), 4)
    for b in (batch, graph_batch):
        got = y.clone()
        lora_triton(got, x, w.a, w.b, w.scaling, w.slice_offsets, max(SIZES), 16, b)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 64, 2048])
def test_triton_kernels_equal_the_reference_on_cuda(dtype, num_tokens):
    """A 0.5B-class fused qkv (896 -> 896 + 128 + 128), 64 slots of ranks up to 16, decode to prefill sizes."""
    from loomserve.adapters.ops_triton import lora_triton

    sizes = [896, 128, 128]
    rng = np.random.default_rng(num_tokens)
    ranks = [[int(r) if rng.random() > 0.2 else 0 for r in rng.choice([4, 8, 16], size=3)] for _ in range(64)]
    w = SlotWeights(64, 16, 896, sizes, ranks, dtype, "cuda")
    token_slots = rng.integers(-1, 64, size=num_tokens)
    x = torch.randn(num_tokens, 896, device="cuda", dtype=dtype)
    y = torch.randn(num_tokens, sum(sizes), device="cuda", dtype=dtype)
    batch = LoRABatch.build(token_slots, torch.device("cuda"))
    got = y.clone()
    lora_triton(got, x, w.a, w.b, w.scaling, w.slice_offsets, max(sizes), 16, batch)
    # bf16 against the float32 function of the same bf16 numbers: the kernel rounds h = x A^T to bf16 before
    # the expand (as a bf16 matmul does), which moves an output by up to about |h| |B| 2^-8 (~0.2 here).
    expected = y.float()
    lora_torch(expected, x.float(), w.a.float(), w.b.float(), w.slices, w.ranks, w.scalings, w.r_max, batch)
    tol = {"rtol": 1e-4, "atol": 1e-3} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 0.5}
    torch.testing.assert_close(got.float(), expected, **tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_kernels_replay_in_a_cuda_graph_with_new_slots_each_time():
    """Captured once over a slot buffer, the launches serve whatever slots the buffer holds at replay."""
    from loomserve.adapters.ops_triton import lora_triton

    sizes = [896, 128, 128]
    rng = np.random.default_rng(0)
    w = SlotWeights(8, 16, 896, sizes, [[16, 8, 4]] * 8, torch.float32, "cuda")
    n = 64
    slot_buffer = torch.full((n,), -1, dtype=torch.int32, device="cuda")
    x = torch.randn(n, 896, device="cuda")
    y0 = torch.randn(n, sum(sizes), device="cuda")
    y = torch.empty_like(y0)

    def forward() -> None:
        y.copy_(y0)
        lora_triton(y, x, w.a, w.b, w.scaling, w.slice_offsets, max(sizes), 16, LoRABatch.for_graph(slot_buffer, 8))

    forward()  # compile and warm the allocator up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward()
    for _ in range(3):
        token_slots = rng.integers(-1, 8, size=n)
        slot_buffer.copy_(torch.from_numpy(token_slots).to(torch.int32))
        graph.replay()
        expected = w.torch_op(y0, x, LoRABatch.build(token_slots, torch.device("cuda")))
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-3)

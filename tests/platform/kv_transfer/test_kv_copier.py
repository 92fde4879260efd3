"""The CPU tier's copies: whole blocks across every layer, device -> host -> device, in any order of ids, of any
cache dtype (an fp8 cache's blocks are bytes)."""

from __future__ import annotations

import pytest
import torch

from loomserve.platform.kv_transfer.copier import BlockCopier


def _caches(device: str, seed: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 10, 4, 2, 8, generator=g).to(device, dtype) for _ in range(3)]  # 3 layers, 10 blocks


def _round_trip(device: str, dtype: torch.dtype = torch.float32) -> None:
    caches = _caches(device, 0, dtype)
    copier = BlockCopier(caches, num_host_blocks=6)
    copier.store([7, 2, 5], [4, 0, 1])  # host blocks 0-1 are one run, 4 another
    before = [c.clone() for c in caches]
    for c in caches:
        c.zero_()
    done = copier.load([1, 4, 0], [3, 9, 8])
    if done is not None:
        done.synchronize()
    for b, c in zip(before, caches):
        b, c = b.view(torch.uint8), c.view(torch.uint8)  # bit for bit (torch.equal takes no float8)
        assert torch.equal(c[:, 3], b[:, 5]) and torch.equal(c[:, 9], b[:, 7]) and torch.equal(c[:, 8], b[:, 2])
        assert not c[:, [0, 1, 2, 4, 5, 6, 7]].any()  # nothing else written


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn], ids=str)
def test_blocks_stored_then_loaded_come_back_into_other_blocks_unchanged(dtype):
    _round_trip("cpu", dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_blocks_round_trip_through_pinned_host_memory_on_a_side_stream():
    _round_trip("cuda")

"""The CPU tier's copies: whole blocks across every layer, device -> host -> device, in any order of ids, across the
chunks host memory is allocated in and in batches of bounded staging, bit for bit in any KV dtype (fp8 included)."""

from __future__ import annotations

import pytest
import torch

from loomserve.platform.kv_transfer.copier import STAGING_BYTES, BlockCopier
from loomserve.platform.kv_transfer.host_memory import CHUNK_BYTES

BLOCK_BYTES = 3 * 2 * 4 * 2 * 8 * 4  # 3 layers, keys and values, 4 tokens, 2 heads of 8 float32


def _caches(device: str, seed: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 10, 4, 2, 8, generator=g).to(device, dtype) for _ in range(3)]  # 3 layers, 10 blocks


def _round_trip(
    device: str, chunk_bytes: int = CHUNK_BYTES, dtype: torch.dtype = torch.float32, staging_bytes: int = STAGING_BYTES
) -> None:
    caches = _caches(device, 0, dtype)
    copier = BlockCopier(caches, num_host_blocks=6, chunk_bytes=chunk_bytes, staging_bytes=staging_bytes)
    copier.store([7, 2, 5, 6], [4, 0, 1, 2])  # host blocks 0-2 are one run, 4 another
    before = [c.clone() for c in caches]
    for c in caches:
        c.zero_()
    copier.load([1, 4, 0, 2], [3, 9, 8, 1])
    for b, c in zip(before, caches):
        b, c = b.view(torch.uint8), c.view(torch.uint8)  # bit for bit, whatever the dtype
        for device_id, original in ((3, 5), (9, 7), (8, 2), (1, 6)):
            assert torch.equal(c[:, device_id], b[:, original])
        assert not c[:, [0, 2, 4, 5, 6, 7]].any()  # nothing else written


def test_blocks_stored_then_loaded_come_back_into_other_blocks_unchanged():
    _round_trip("cpu")


def test_copies_staged_in_batches_come_back_unchanged():
    _round_trip("cpu", staging_bytes=3 * BLOCK_BYTES)  # 4 blocks in batches of 3: the run 0-2, then block 4


def test_fp8_blocks_round_trip_bit_for_bit():
    _round_trip("cpu", dtype=torch.float8_e4m3fn)


def test_runs_of_blocks_that_cross_host_memory_chunks_come_back_unchanged():
    _round_trip("cpu", chunk_bytes=2 * BLOCK_BYTES)  # chunks of 2 blocks: the run 0-2 spans two of them


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_blocks_round_trip_through_pinned_host_memory_on_a_side_stream():
    _round_trip("cuda", chunk_bytes=2 * BLOCK_BYTES)

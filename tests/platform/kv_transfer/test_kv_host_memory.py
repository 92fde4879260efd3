"""The CPU tier's host memory: start-up allocates one chunk, a background thread the others from the first copy on,
and a chunk that cannot be allocated fails the copy that needs it rather than leaving it waiting."""

from __future__ import annotations

import pytest
import torch

from loomserve.platform.kv_transfer.host_memory import HostBlocks

BLOCK = (3, 2, 4, 2, 8)  # 3 layers, keys and values, 4 tokens, 2 heads of 8
BLOCK_BYTES = 3 * 2 * 4 * 2 * 8 * 4  # in float32


def _host(num_blocks: int) -> HostBlocks:
    return HostBlocks(num_blocks, BLOCK, torch.float32, torch.device("cpu"), chunk_bytes=2 * BLOCK_BYTES)


def test_start_up_allocates_one_chunk_and_the_first_copy_starts_the_rest():
    host = _host(5)
    assert [c is not None for c in host.chunks] == [True, False, False]
    list(host.runs([0]))  # what a copy into host block 0 does
    assert host.chunk(2).shape == (1, *BLOCK)  # waits for it: the last chunk holds the last block
    assert all(c is not None for c in host.chunks)


class _OutOfMemory(HostBlocks):
    def _allocate(self, num_blocks: int) -> torch.Tensor:
        if getattr(self, "chunks", None) is not None:  # the first chunk succeeds, the background ones fail
            raise RuntimeError("out of pinnable memory")
        return super()._allocate(num_blocks)


def test_a_chunk_that_cannot_be_allocated_fails_the_copy_needing_it():
    host = _OutOfMemory(4, BLOCK, torch.float32, torch.device("cpu"), chunk_bytes=2 * BLOCK_BYTES)
    assert len(list(host.runs([0, 1]))) == 1  # the first chunk is there
    with pytest.raises(RuntimeError, match="could not be allocated: out of pinnable memory"):
        list(host.runs([2]))

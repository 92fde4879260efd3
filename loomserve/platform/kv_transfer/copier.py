"""The CPU tier's copies, in the runner: whole blocks, every layer at once, between the device KV cache and host
memory laid out block-major [host_blocks, layers, 2, block_size, kv_heads, head_dim] (`host_memory.py`).

Per-block, per-layer copies of a few KiB run far below the link's bandwidth, so a batch of blocks is gathered across
layers into one staging tensor on the device (64 MiB at most) and crosses in one copy per run of consecutive host
blocks. On CUDA the
copies run on a side stream, after the work the compute stream has queued, and the compute stream waits for them
(a stream wait: the host never blocks): the step that issued a store writes over its blocks only once they are
saved, and the step that issued a load reads its blocks only once they have landed, so a request is scheduled in
the step its blocks load in. On CPU the same code runs with a second host pool, synchronously.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from loomserve.platform.attention.kv_quant import byte_view
from loomserve.platform.kv_transfer.host_memory import CHUNK_BYTES, HostBlocks

STAGING_BYTES = 64 << 20  # the most a copy stages on the device at once


class BlockCopier:
    def __init__(
        self, kv_caches: list[torch.Tensor], num_host_blocks: int, chunk_bytes: int = CHUNK_BYTES,
        staging_bytes: int = STAGING_BYTES,
    ) -> None:
        self.caches = kv_caches  # per layer [2, num_blocks, block_size, kv_heads, head_dim]
        first = kv_caches[0]
        self.device = first.device
        block_shape = (len(kv_caches), 2, *first.shape[2:])  # one block, every layer
        self.host = HostBlocks(num_host_blocks, block_shape, first.dtype, self.device, chunk_bytes)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.batch_blocks = max(1, staging_bytes // self.host.block_bytes)

    def store(self, device_ids: list[int], host_ids: list[int]) -> None:
        """Copy device blocks into host blocks, before the compute stream's later work (a new owner's writes)."""
        with self._side_stream():
            for device_batch, host_batch in self._batches(device_ids, host_ids):
                staging = gather_blocks(self.caches, device_index(device_batch, self.device))
                for host, first in self.host.runs(host_batch):
                    host.copy_(staging[first : first + len(host)], non_blocking=True)

    def load(self, host_ids: list[int], device_ids: list[int]) -> None:
        """Copy host blocks into device blocks, before the compute stream's later work (the forward reading them)."""
        with self._side_stream():
            for device_batch, host_batch in self._batches(device_ids, host_ids):
                shape = (len(host_batch), *self.host.block_shape)
                staging = torch.empty(shape, dtype=self.host.dtype, device=self.device)
                for host, first in self.host.runs(host_batch):
                    staging[first : first + len(host)].copy_(host, non_blocking=True)
                scatter_blocks(self.caches, staging, device_index(device_batch, self.device))

    def _batches(self, device_ids: list[int], host_ids: list[int]) -> Iterator[tuple[list[int], list[int]]]:
        """Both lists ordered by host block (consecutive host blocks make one copy), in batches whose staging stays
        within the staging bytes: the device memory left beside the KV cache was measured without them."""
        pairs = sorted(zip(host_ids, device_ids))
        for start in range(0, len(pairs), self.batch_blocks):
            batch = pairs[start : start + self.batch_blocks]
            yield [d for _, d in batch], [h for h, _ in batch]

    @contextlib.contextmanager
    def _side_stream(self) -> Iterator[None]:
        """Run on the side stream, after everything the compute stream has queued (the steps before this one); the
        compute stream's later work waits for what ran there."""
        if self.stream is None:
            yield
            return
        compute = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            yield
        compute.wait_stream(self.stream)

def device_index(ids: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long).to(device, non_blocking=True)


def gather_blocks(caches: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """The blocks `index` of every layer as one tensor [n, layers, 2, block_size, kv_heads, head_dim]."""
    return torch.stack([cache.index_select(1, index).transpose(0, 1) for cache in caches], dim=1)


def scatter_blocks(caches: list[torch.Tensor], blocks: torch.Tensor, index: torch.Tensor) -> None:
    """Write `blocks` [n, layers, 2, block_size, kv_heads, head_dim] into the blocks `index` of every layer."""
    for layer, cache in enumerate(caches):
        byte_view(cache).index_copy_(1, index, byte_view(blocks[:, layer].transpose(0, 1)))

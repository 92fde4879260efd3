"""The CPU tier's host memory: KV blocks [host_blocks, layers, 2, block_size, kv_heads, head_dim], allocated in
chunks so that start-up does not wait for the whole tier.

Pinning tens of GiB (what lets copies run asynchronously at the link's speed) takes seconds, so only the first chunk
is allocated at start-up; a background thread allocates the others, in order, from the tier's first copy on (not
before: allocating pinned memory while the runner captures its CUDA graphs is refused). The host pool hands out low
block ids first (`host_pool.py`), so the chunks are there long before the tier fills; a copy into a chunk not yet
allocated waits for it. Chunks are a power of two bytes at most: torch's pinned-memory allocator rounds every
allocation up to one, which would waste up to half of a tier allocated whole.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator

import torch

logger = logging.getLogger(__name__)

CHUNK_BYTES = 256 << 20


class HostBlocks:
    def __init__(
        self, num_blocks: int, block_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_shape = block_shape  # one block, every layer: (layers, 2, block_size, kv_heads, head_dim)
        self.dtype = dtype
        self.pin = device.type == "cuda"  # the copies' other end: pinned memory for a GPU's
        if self.pin and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.block_bytes = math.prod(block_shape) * dtype.itemsize
        self.blocks_per_chunk = max(1, chunk_bytes // self.block_bytes)
        per_chunk = self.blocks_per_chunk
        self.sizes = [min(per_chunk, num_blocks - first) for first in range(0, num_blocks, per_chunk)]  # in blocks
        self.chunks: list[torch.Tensor | None] = [self._allocate(self.sizes[0])] + [None] * (len(self.sizes) - 1)
        self.failed: BaseException | None = None
        self.allocated = threading.Condition()
        self.allocating: threading.Thread | None = None

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_bytes

    def _allocate(self, num_blocks: int) -> torch.Tensor:
        # empty, not zeros: touching every page would cost what chunking saves
        return torch.empty((num_blocks, *self.block_shape), dtype=self.dtype, pin_memory=self.pin)

    def _allocate_rest(self) -> None:
        """Start the background thread that allocates the chunks after the first (once)."""
        if self.allocating is None and len(self.chunks) > 1:
            self.allocating = threading.Thread(target=self._allocate_chunks, name="loomserve-kv-host-alloc",
                                               daemon=True)
            self.allocating.start()

    def _allocate_chunks(self) -> None:
        try:
            if self.pin:
                torch.cuda.set_device(self.device)  # pinning from a thread would otherwise set up a context on GPU 0
            for i, n in enumerate(self.sizes[1:], 1):
                chunk = self._allocate(n)
                with self.allocated:
                    self.chunks[i] = chunk
                    self.allocated.notify_all()
        except Exception as e:  # e.g. out of pinnable memory: the copies waiting for a chunk fail, never hang
            logger.error("allocating the CPU KV tier's host memory failed: %s", e)
            with self.allocated:
                self.failed = e
                self.allocated.notify_all()

    def chunk(self, index: int) -> torch.Tensor:
        """Chunk `index` [blocks_per_chunk (or fewer, the last), *block_shape], once allocated."""
        chunk = self.chunks[index]
        if chunk is not None:
            return chunk
        self._allocate_rest()
        with self.allocated:
            while self.chunks[index] is None and self.failed is None:
                self.allocated.wait()
        if self.chunks[index] is None:
            raise RuntimeError(f"the CPU KV tier's host memory could not be allocated: {self.failed}")
        return self.chunks[index]

    def runs(self, host_ids: list[int]) -> Iterator[tuple[torch.Tensor, int]]:
        """For sorted `host_ids`: (host blocks [n, *block_shape], index of their first id) of each run of consecutive
        ids within one chunk, each copied in one transfer."""
        self._allocate_rest()
        start = 0
        for i in range(1, len(host_ids) + 1):
            if i < len(host_ids) and host_ids[i] == host_ids[i - 1] + 1 and host_ids[i] % self.blocks_per_chunk:
                continue
            chunk, first = divmod(host_ids[start], self.blocks_per_chunk)
            yield self.chunk(chunk)[first : first + i - start], start
            start = i

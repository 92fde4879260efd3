"""The CPU tier's copies, in the runner: whole blocks, every layer at once, between the device KV cache and a host
pool laid out block-major [host_blocks, layers, 2, block_size, kv_heads, head_dim].

Per-block, per-layer copies of a few KiB run far below the link's bandwidth, so a batch of blocks is gathered across
layers into one staging tensor on the device and crosses in one copy per run of consecutive host blocks. On CUDA the
copies run on a side stream: stores must land before the step that writes over their blocks (the compute stream
waits for them), loads only before a later step reads theirs (the scheduler waits for their event). On CPU the same
code runs with a second host pool, synchronously.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from loomserve.platform.attention.kv_quant import byte_view


class BlockCopier:
    def __init__(self, kv_caches: list[torch.Tensor], num_host_blocks: int) -> None:
        self.caches = kv_caches  # per layer [2, num_blocks, block_size, kv_heads, head_dim]
        first = kv_caches[0]
        self.device = first.device
        self.block_shape = (len(kv_caches), 2, *first.shape[2:])  # one block, every layer
        on_cuda = self.device.type == "cuda"
        # empty, not zeros: touching every page of tens of GiB would stall start-up; pinned for async copies.
        self.host = torch.empty((num_host_blocks, *self.block_shape), dtype=first.dtype, pin_memory=on_cuda)
        self.stream = torch.cuda.Stream(self.device) if on_cuda else None

    def store(self, device_ids: list[int], host_ids: list[int]) -> None:
        """Copy device blocks into host blocks; later work on the compute stream (a new owner's writes) waits."""
        device_ids, host_ids = _by_host_id(device_ids, host_ids)
        with self._side_stream():
            staging = gather_blocks(self.caches, device_index(device_ids, self.device))
            for dst, src, n in _runs(host_ids):
                self.host[dst : dst + n].copy_(staging[src : src + n], non_blocking=True)
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def load(self, host_ids: list[int], device_ids: list[int]) -> torch.cuda.Event | None:
        """Copy host blocks into device blocks; returns the event that fires once they have landed (None on CPU:
        landed on return)."""
        device_ids, host_ids = _by_host_id(device_ids, host_ids)
        with self._side_stream():
            staging = torch.empty((len(host_ids), *self.block_shape), dtype=self.host.dtype, device=self.device)
            for dst, src, n in _runs(host_ids):
                staging[src : src + n].copy_(self.host[dst : dst + n], non_blocking=True)
            scatter_blocks(self.caches, staging, device_index(device_ids, self.device))
            if self.stream is None:
                return None
            done = torch.cuda.Event()
            done.record(self.stream)
            return done

    def wait(self) -> None:
        """Every copy issued so far has landed."""
        if self.stream is not None:
            self.stream.synchronize()

    @contextlib.contextmanager
    def _side_stream(self) -> Iterator[None]:
        """Run on the side stream, after everything the compute stream has queued (the steps before this one)."""
        if self.stream is None:
            yield
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            yield


def device_index(ids: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long).to(device, non_blocking=True)


def gather_blocks(caches: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """The blocks `index` of every layer as one tensor [n, layers, 2, block_size, kv_heads, head_dim]."""
    return torch.stack([cache.index_select(1, index).transpose(0, 1) for cache in caches], dim=1)


def scatter_blocks(caches: list[torch.Tensor], blocks: torch.Tensor, index: torch.Tensor) -> None:
    """Write `blocks` [n, layers, 2, block_size, kv_heads, head_dim] into the blocks `index` of every layer."""
    for layer, cache in enumerate(caches):
        byte_view(cache).index_copy_(1, index, byte_view(blocks[:, layer].transpose(0, 1)))


def _by_host_id(device_ids: list[int], host_ids: list[int]) -> tuple[list[int], list[int]]:
    """Both lists ordered by host block, so consecutive host blocks make one copy."""
    pairs = sorted(zip(host_ids, device_ids))
    return [d for _, d in pairs], [h for h, _ in pairs]


def _runs(host_ids: list[int]) -> Iterator[tuple[int, int, int]]:
    """(first host block, first staging row, length) of each run of consecutive host blocks in sorted `host_ids`."""
    start = 0
    for i in range(1, len(host_ids) + 1):
        if i == len(host_ids) or host_ids[i] != host_ids[i - 1] + 1:
            yield host_ids[start], start, i - start
            start = i

"""What every KV connector's scheduler half does with blocks it loads from elsewhere (host memory, another
instance): take device blocks for them, make them prefix-cache hits once they have landed, and hold them for the
request through one scheduling pass. A load that lands within its step (the CPU tier: the forward waits for the
copies) lands at once, and its request starts in the same pass; one that travels longer (another instance's KV)
holds its request back until the runner reports it landed.

A request that ends while its blocks travel leaves them to the load, which frees them once landed (the copy may
still be writing them). Held blocks that their request did not take within a step go back to the pool, still
cached: a request that cannot start must not keep others from running.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from loomserve.platform.features import SchedulerHook
from loomserve.platform.kv_cache.manager import cdiv

if TYPE_CHECKING:
    from loomserve.platform.kv_cache import KVBlock, KVCacheManager
    from loomserve.platform.request import Request


@dataclass
class PendingLoad:
    prefix: list[KVBlock]  # the request's blocks already on the device, held so the load continues them
    blocks: list[KVBlock]  # device blocks taken for the load, in prefix order
    hashes: list[bytes]  # their block hashes
    abandoned: bool = False  # the request ended meanwhile: free the blocks once landed


class BlockLoads(SchedulerHook):
    """The shared scheduler half; a connector decides in `admits` what to load and calls `start_load`."""

    def __init__(self) -> None:
        self.kv: KVCacheManager | None = None
        self.loading: dict[str, PendingLoad] = {}
        self.held: dict[str, list[KVBlock]] = {}  # landed (and their prefix), cached, kept until the request starts
        self.stale: set[str] = set()  # held at the last step's start
        self.loaded_tokens = 0  # prefix tokens brought in, ever

    def attach_kv(self, kv: KVCacheManager) -> None:
        self.kv = kv

    def begin_step(self, running: list[Request]) -> None:
        for request_id in self.stale & self.held.keys():
            self._free(self.held.pop(request_id))
        self.stale = set(self.held)

    def has_room(self, request: Request, on_device: list[KVBlock], num_blocks: int) -> bool:
        """Whether the pool holds `num_blocks` loaded blocks and the rest of the prompt after them."""
        computed = (len(on_device) + num_blocks) * self.kv.block_size
        needed = num_blocks + cdiv(request.num_tokens - computed, self.kv.block_size)
        return needed <= self.kv.pool.num_free_blocks - sum(1 for b in on_device if b.ref_cnt == 0)

    def start_load(self, request: Request, on_device: list[KVBlock], hashes: list[bytes]) -> list[int]:
        """Take device blocks for `hashes` (the blocks after `on_device`); returns their ids. The caller has kept
        whatever the load reads from being given away by the evictions this allocation causes."""
        self.kv.pool.touch(on_device)  # the allocation below must not evict the prefix the load continues
        blocks = self.kv.pool.allocate(len(hashes))
        self.loading[request.request_id] = PendingLoad(on_device, blocks, hashes)
        return [b.block_id for b in blocks]

    def land(self, request_id: str, ok: bool) -> None:
        """A load has landed (or failed: its blocks are freed uncached and the request computes them itself)."""
        load = self.loading.pop(request_id)
        blocks = load.prefix + load.blocks
        if ok:
            for block, block_hash in zip(load.blocks, load.hashes):
                self.kv.pool.cache(block, block_hash)
            self.loaded_tokens += len(load.blocks) * self.kv.block_size
        if load.abandoned or not ok:
            self._free(blocks)
        else:
            self.held.setdefault(request_id, []).extend(blocks)

    def commit(self, request: Request, start: int, num_tokens: int) -> None:
        """The request started: its prefix hit holds the loaded blocks now, so this hook lets go of them."""
        if self.held:
            self._free(self.held.pop(request.request_id, []))

    def release(self, request: Request) -> None:
        load = self.loading.get(request.request_id)
        if load is not None:
            load.abandoned = True  # the copy may still be writing its blocks: free them once it has landed
        self._free(self.held.pop(request.request_id, []))

    def _free(self, blocks: list[KVBlock]) -> None:
        self.kv.pool.free(list(reversed(blocks)))  # tail blocks first to be evicted, as the manager frees

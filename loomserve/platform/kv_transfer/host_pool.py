"""The CPU tier's bookkeeping, beside the scheduler: which host block holds which block hash, least recently used
first out, and which host blocks a load in flight still reads (those are never given away)."""

from __future__ import annotations

from collections import OrderedDict


class HostBlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # popped from the end: low ids first
        self.by_hash: OrderedDict[bytes, int] = OrderedDict()  # least recently used first
        self.readers: dict[int, int] = {}  # host block -> loads in flight reading it

    def lookup(self, block_hash: bytes) -> int | None:
        return self.by_hash.get(block_hash)

    def take(self, block_hash: bytes) -> int | None:
        """A host block to store `block_hash` in (None: the hash is held already, or every block is being read)."""
        if block_hash in self.by_hash:
            self.by_hash.move_to_end(block_hash)
            return None
        host_id = self.free.pop() if self.free else self._evict()
        if host_id is not None:
            self.by_hash[block_hash] = host_id
        return host_id

    def read(self, block_hashes: list[bytes]) -> list[int]:
        """The host blocks of `block_hashes` (all held), kept from eviction until `done_reading`."""
        host_ids = []
        for block_hash in block_hashes:
            self.by_hash.move_to_end(block_hash)
            host_id = self.by_hash[block_hash]
            self.readers[host_id] = self.readers.get(host_id, 0) + 1
            host_ids.append(host_id)
        return host_ids

    def done_reading(self, host_ids: list[int]) -> None:
        for host_id in host_ids:
            self.readers[host_id] -= 1
            if not self.readers[host_id]:
                del self.readers[host_id]

    def _evict(self) -> int | None:
        victim = next((h for h, i in self.by_hash.items() if i not in self.readers), None)
        return None if victim is None else self.by_hash.pop(victim)

"""The front end's processor cache (vLLM's `--mm-processor-cache-gb`): processed items by the digest of their encoded
media, so an image, video or audio clip sent again is neither decoded nor preprocessed again.

The key is a SHA-256 of the bytes as sent (and of what else decoding reads: the modality, an audio clip's format, a
multi-frame JPEG video's URL), known before any decoding; the item it maps to carries its own content hash
(`hashing.py`), so the prefix and encoder caches see exactly the item a fresh decode would give. A hit charges the
request's media budget what decoding the item charged, so a budget means the same with or without the cache.
Least recently used entries go first when the tensors held pass the capacity; the media pool's threads share it.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

from loomserve.modalities.budget import MediaSpend
from loomserve.modalities.media import MediaRef
from loomserve.modalities.processors.base import ProcessedItem
from loomserve.modalities.video import is_jpeg_frames


@dataclass(frozen=True)
class CachedItem:
    item: ProcessedItem
    charges: dict[str, float]  # what decoding the item charged to its request's budget, by unit
    nbytes: int  # bytes of the item's tensors


def media_key(ref: MediaRef, data: bytes) -> str:
    """The digest of everything decoding `ref` reads."""
    h = hashlib.sha256(f"{ref.modality}\0{ref.format}\0".encode())
    if is_jpeg_frames(ref.url):  # the frames are in the URL, not in the bytes read
        h.update(ref.url.encode())
    h.update(data)
    return h.hexdigest()


def charges_between(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What was charged to a tally between two snapshots of its `spent`."""
    return {unit: amount - before.get(unit, 0) for unit, amount in after.items() if amount != before.get(unit, 0)}


class ProcessorCache:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.entries: OrderedDict[str, CachedItem] = OrderedDict()
        self.used = 0
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    def get(self, key: str, spend: MediaSpend) -> ProcessedItem | None:
        """The item under `key`, its charges made again to `spend`; None when not cached."""
        with self._lock:
            entry = self.entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self.entries.move_to_end(key)
            self.hits += 1
        for unit, amount in entry.charges.items():
            spend.charge(unit, amount)
        return entry.item

    def put(self, key: str, item: ProcessedItem, charges: dict[str, float]) -> None:
        """Keep `item` (unless it alone is over the capacity), dropping the least recently used to make room."""
        nbytes = sum(t.nbytes for t in item.data.values())
        if nbytes > self.capacity:
            return
        with self._lock:
            old = self.entries.pop(key, None)
            self.used -= old.nbytes if old is not None else 0
            while self.used + nbytes > self.capacity:
                self.used -= self.entries.popitem(last=False)[1].nbytes
            self.entries[key] = CachedItem(item, charges, nbytes)
            self.used += nbytes

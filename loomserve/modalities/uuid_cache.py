"""Media parts named by the client (vLLM's `uuid` on a content part): the loaded item is kept under its uuid, so a
later part with the same uuid and no media (`"image_url": {}` or null) reuses it without sending it again. The
reused item is processed as the first was, so it has the same content hash and hits the encoder and prefix caches.
A front-end LRU of loaded (decoded and processed) items, bounded by count."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from loomserve.modalities.media import MediaError, MediaRef

DEFAULT_CAPACITY = 64  # loaded items kept (an image of 1 MPixel is 3 MB of uint8 pixels)


class MediaUUIDCache:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self.items: OrderedDict[tuple[str, str], Any] = OrderedDict()  # (modality, uuid) -> loaded item

    def cached(self, refs: list[MediaRef]) -> dict[int, Any]:
        """Position in `refs` -> the loaded item of each reference that carries only a uuid; MediaError (before any
        loading) for a uuid this server does not hold."""
        found = {}
        for i, ref in enumerate(refs):
            if ref.needs_cache:
                key = (ref.modality, ref.uuid)
                if key not in self.items:
                    raise MediaError(f"no {ref.modality} with uuid {ref.uuid!r} is cached on this server: send the "
                                     "media itself with that uuid first")
                self.items.move_to_end(key)
                found[i] = self.items[key]
        return found

    def merge(self, refs: list[MediaRef], loaded: dict[str, list[Any]], cached: dict[int, Any]) -> dict[str, list[Any]]:
        """Every reference's loaded item by modality in prompt order: `loaded` holds those read now (in order),
        `cached` the others; items read now with a uuid are kept for later parts."""
        fresh = {modality: iter(items) for modality, items in loaded.items()}
        merged: dict[str, list[Any]] = {}
        for i, ref in enumerate(refs):
            item = cached[i] if i in cached else next(fresh[ref.modality])
            merged.setdefault(ref.modality, []).append(item)
            if ref.uuid is not None and i not in cached:
                self._keep((ref.modality, ref.uuid), item)
        return merged

    def _keep(self, key: tuple[str, str], item: Any) -> None:
        self.items[key] = item
        self.items.move_to_end(key)
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)

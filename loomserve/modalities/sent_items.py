"""Media items cross to an engine once while it still holds them (vLLM's sender/receiver processor cache).

Each front end keeps, per engine it sends to, a `MediaSender`: the content hashes of the items that engine holds, by
the bytes of their tensors, least recently used first. The engine keeps one `MediaReceiver` per sender, holding the
tensors themselves. Both sides make the same moves in the same order (an item found is touched; one not found is
added, evicting the least recently used until it fits), so they always agree: the sender updates its side in the
same call that writes the request to the engine's socket, which delivers messages in order, and the receiver
updates its side before anything else looks at the request. An item the sender finds is sent without its tensors;
the receiver puts them back from its store, and the request then holds its own reference, so no later eviction on
either side can take them from a request. Items are keyed by content hash (`hashing.py`): equal hashes, equal data.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from loomserve.modalities.inputs import MultiModalItem

if TYPE_CHECKING:
    from loomserve.modalities.frontend import MultiModalFrontend
    from loomserve.platform.config import EngineConfig
    from loomserve.platform.messages import EngineCoreRequest


@dataclass
class SentMedia:
    """What a request's media owe the sender's store: who sent them, and which items came without tensors."""

    sender: str
    held: list[int] = field(default_factory=list)  # indexes into the request's mm_items


def _nbytes(data: dict[str, torch.Tensor]) -> int:
    return sum(t.nbytes for t in data.values())


class _SizedLRU:
    """content hash -> (bytes, value): the moves both sides make."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[str, tuple[int, dict[str, torch.Tensor] | None]] = OrderedDict()
        self.used = 0

    def touch(self, key: str) -> dict[str, torch.Tensor] | None:
        self.entries.move_to_end(key)
        return self.entries[key][1]

    def add(self, key: str, nbytes: int, value: dict[str, torch.Tensor] | None) -> None:
        """Keep `key` (unless it alone is over the capacity), evicting the least recently used to make room."""
        if nbytes > self.capacity:
            return
        while self.used + nbytes > self.capacity:
            self.used -= self.entries.popitem(last=False)[1][0]
        self.entries[key] = (nbytes, value)
        self.used += nbytes


def _stored(item: MultiModalItem) -> bool:
    """Media items with tensors go through the stores (prompt embeddings are rows of their own request)."""
    return bool(item.data) and not item.is_prompt_embeds


class MediaSender:
    """The front end's side for one engine."""

    def __init__(self, capacity_bytes: int) -> None:
        self.sender_id = uuid.uuid4().hex  # several front ends may send to one engine: each has its own store there
        self.held = _SizedLRU(capacity_bytes)

    def strip(self, request: EngineCoreRequest) -> EngineCoreRequest:
        """The request as it goes to the engine now: items the engine holds without their tensors. Call it only
        when the request is written to the engine's socket at once."""
        if not any(_stored(item) for item in request.mm_items):
            return request
        sent = SentMedia(self.sender_id)
        items = []
        for i, item in enumerate(request.mm_items):
            if _stored(item):
                if item.content_hash in self.held.entries:
                    self.held.touch(item.content_hash)
                    item = dataclasses.replace(item, data={})
                    sent.held.append(i)
                else:
                    self.held.add(item.content_hash, _nbytes(item.data), None)
            items.append(item)
        return dataclasses.replace(request, mm_items=items, mm_sent=sent)


class MediaReceiver:
    """The engine's side for one sender: the tensors of the items it was sent."""

    def __init__(self, capacity_bytes: int) -> None:
        self.store = _SizedLRU(capacity_bytes)

    def restore(self, request: EngineCoreRequest, held: list[int]) -> None:
        """Put back the tensors of the items sent without them (`held`); keep those sent with them."""
        for i, item in enumerate(request.mm_items):
            if i in held:
                if item.content_hash not in self.store.entries:  # the two sides disagree: a bug, never the client's
                    raise RuntimeError(f"media item {item.content_hash} was sent as held, but the engine does not "
                                       "hold it")
                request.mm_items[i] = dataclasses.replace(item, data=self.store.touch(item.content_hash))
            elif _stored(item):
                self.store.add(item.content_hash, _nbytes(item.data), item.data)


class MediaReceivers:
    """The engine's receivers, one per sender, made as senders first appear."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.by_sender: dict[str, MediaReceiver] = {}

    def restore(self, request: EngineCoreRequest) -> EngineCoreRequest:
        """The request with every item's tensors, as its sender had them."""
        sent = request.mm_sent
        if sent is not None:
            receiver = self.by_sender.get(sent.sender)
            if receiver is None:
                receiver = self.by_sender[sent.sender] = MediaReceiver(self.capacity)
            receiver.restore(request, sent.held)
            request.mm_sent = None
        return request


class MediaSenders:
    """A front end's senders, one per engine it sends to."""

    def __init__(self, capacity_bytes: int, num_engines: int) -> None:
        self.capacity = capacity_bytes
        self.by_engine = [MediaSender(capacity_bytes) for _ in range(num_engines)]

    def strip(self, request: EngineCoreRequest, engine: int) -> EngineCoreRequest:
        return self.by_engine[engine].strip(request)

    def reset(self, engine: int) -> None:
        """After a stripped request failed to reach `engine`: start over under a new sender id (a new, empty store
        on the engine's side), as the two sides may no longer agree."""
        self.by_engine[engine] = MediaSender(self.capacity)


def media_senders(config: EngineConfig, frontend: MultiModalFrontend, num_engines: int) -> MediaSenders | None:
    """The front end's senders for a model that takes media, sized as its processor cache (0: off, as vLLM's)."""
    capacity = config.mm_config.processor_cache_bytes
    return MediaSenders(capacity, num_engines) if frontend.processor is not None and capacity > 0 else None

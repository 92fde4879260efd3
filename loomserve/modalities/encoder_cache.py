"""Encoder outputs by content hash, shared across requests: what is cached, what each step must encode.

`EncoderCacheManager` is the scheduler's side (the multimodal feature's scheduler hook). It counts in embedding
tokens (capacity = memory budget / bytes per embedding). An entry is pinned while some request still has tokens of
that item to compute; unpinned entries stay cached and are evicted least recently used first when a new item needs
room. For each scheduled chunk the scheduler asks `fit` how far the chunk may go (cutting it before the first item
that can neither be found nor encoded this step, for lack of room or of the per-step encoder budget), then
`commit`s it; `step_data` tells the runner the items to encode and the hashes to drop.
`EncoderCache` is the runner's side: the tensors themselves.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from loomserve.modalities.inputs import MultiModalItem
from loomserve.platform.features import SchedulerHook

if TYPE_CHECKING:
    from loomserve.modalities.config import MultiModalConfig
    from loomserve.platform.config import EngineConfig, ModelConfig
    from loomserve.platform.request import Request


def encoder_cache_capacity(model_config: ModelConfig, mm_config: MultiModalConfig) -> int:
    """Embeddings the cache holds: its memory budget over the bytes of one embedding."""
    itemsize = torch.empty((), dtype=model_config.dtype).element_size()
    return mm_config.encoder_cache_memory // (model_config.text_config.hidden_size * itemsize)


@dataclass
class EncoderStep:
    budget: int  # embedding tokens the encoders may still produce this step
    to_encode: dict[str, MultiModalItem] = field(default_factory=dict)
    freed: list[str] = field(default_factory=list)


class EncoderCacheManager(SchedulerHook):
    """The multimodal feature's scheduler hook; its step data: the content hashes to encode and to drop."""

    name = "mm"

    def __init__(self, capacity: int, budget_per_step: int) -> None:
        self.capacity = capacity  # embedding tokens
        self.budget_per_step = budget_per_step
        self.sizes: dict[str, int] = {}  # cached (or being encoded this step) hash -> tokens
        self.pins: dict[str, set[str]] = {}  # hash -> ids of requests that still need it
        self.unpinned: OrderedDict[str, int] = OrderedDict()  # eviction order, least recently used first
        self.used = 0
        self.step = EncoderStep(budget_per_step)
        self.num_encoded = 0  # items sent to the encoders so far

    @classmethod
    def for_engine(cls, config: EngineConfig) -> EncoderCacheManager:
        """Sized by the memory budget; each step may encode as many embeddings as the step's token budget."""
        capacity = encoder_cache_capacity(config.model_config, config.mm_config)
        return cls(capacity, config.scheduler_config.max_num_batched_tokens)

    def begin_step(self, running: list[Request]) -> None:
        self.step = EncoderStep(self.budget_per_step)

    def step_data(self, running: list[Request]) -> dict[str, list[str]] | None:
        """The hashes of the items to encode this step (each belongs to a request of the step) and of the outputs to
        drop before encoding them; None when neither."""
        if not (self.step.to_encode or self.step.freed):
            return None
        return {"encode": list(self.step.to_encode), "free": self.step.freed}

    def fit(self, request: Request, start: int, num_tokens: int) -> int:
        """How many of the `num_tokens` tokens from `start` can run this step: up to the first item that is
        neither cached nor encodable now (no room even after evicting what the chunk does not use, or over the
        step's encoder budget, which only the step's first item may exceed). Items the request has computed
        past are unpinned first."""
        if not request.mm_items:
            return num_tokens
        self._unpin_consumed(request, start)
        end = start + num_tokens
        while end > start:
            items = self._touched(request, start, end)
            new = self._new(items)
            if not new:  # every item the chunk touches is cached (always so once a request decodes)
                return end - start
            needed = {it.content_hash for it in items}
            room = self.capacity - self.used + sum(n for h, n in self.unpinned.items() if h not in needed)
            budget, first = self.step.budget, not self.step.to_encode
            cut = None
            for item in new:
                size = item.placeholder.length
                if size > room or (size > budget and not first):
                    cut = item.placeholder.offset
                    break
                room, budget, first = room - size, budget - size, False
            if cut is None:
                return end - start
            end = cut
        return 0

    def commit(self, request: Request, start: int, num_tokens: int) -> None:
        """Pin every item the chunk touches; allocate (evicting unpinned entries) and queue the uncached ones."""
        if not request.mm_items:
            return
        items = self._touched(request, start, start + num_tokens)
        for item in items:
            if item.content_hash in self.sizes:
                self._pin(item.content_hash, request.request_id)
        for item in self._new(items):
            h, size = item.content_hash, item.placeholder.length
            self._evict_for(size)
            self.sizes[h] = size
            self.used += size
            self.step.budget -= size
            self.step.to_encode[h] = item
            self.num_encoded += 1
            self._pin(h, request.request_id)

    def _touched(self, request: Request, start: int, end: int) -> list[MultiModalItem]:
        return [it for it in request.mm_items if it.placeholder.end > start and it.placeholder.offset < end]

    def _new(self, items: list[MultiModalItem]) -> list[MultiModalItem]:
        """Items not cached, once per hash."""
        new: dict[str, MultiModalItem] = {}
        for item in items:
            if item.content_hash not in self.sizes:
                new.setdefault(item.content_hash, item)
        return list(new.values())

    def release(self, request: Request) -> None:
        """Unpin everything a finished or preempted request held."""
        for item in request.mm_items:
            self._unpin(item.content_hash, request.request_id)

    def _unpin_consumed(self, request: Request, start: int) -> None:
        still_needed = {it.content_hash for it in request.mm_items if it.placeholder.end > start}
        for item in request.mm_items:
            if item.placeholder.end <= start and item.content_hash not in still_needed:
                self._unpin(item.content_hash, request.request_id)

    def _pin(self, h: str, request_id: str) -> None:
        self.unpinned.pop(h, None)
        self.pins.setdefault(h, set()).add(request_id)

    def _unpin(self, h: str, request_id: str) -> None:
        holders = self.pins.get(h)
        if holders is None or request_id not in holders:
            return
        holders.discard(request_id)
        if not holders:
            del self.pins[h]
            self.unpinned[h] = self.sizes[h]

    def _evict_for(self, size: int) -> None:
        while self.capacity - self.used < size:
            h, n = self.unpinned.popitem(last=False)
            del self.sizes[h]
            self.used -= n
            if self.step.to_encode.pop(h, None) is None:  # encoded in an earlier step: the runner holds it
                self.step.freed.append(h)
            else:
                self.num_encoded -= 1


class EncoderCache:
    """The runner's encoder outputs, [tokens, hidden] per content hash, on the model's device."""

    def __init__(self) -> None:
        self.outputs: dict[str, torch.Tensor] = {}

    def update(self, freed: list[str], hashes: list[str], outputs: list[torch.Tensor]) -> None:
        for h in freed:
            del self.outputs[h]
        self.outputs.update(zip(hashes, outputs))

    def __getitem__(self, content_hash: str) -> torch.Tensor:
        return self.outputs[content_hash]

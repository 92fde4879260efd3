"""The front end's multimodal step: media from `multi_modal_data` or chat content parts -> expanded prompt
token ids and processed items, checked against what the model takes, the limits and the encoder cache.

Chat media are decoded and preprocessed as soon as they are read, on the media pool (PIL lets go of the GIL while it
decodes and resizes), or taken from the processor cache when the same bytes came before."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loomserve.modalities.budget import MediaBudget, MediaSpend
from loomserve.modalities.config import MultiModalConfig
from loomserve.modalities.encoder_cache import encoder_cache_capacity
from loomserve.modalities.inputs import MultiModalItem
from loomserve.modalities.media import MediaError, MediaFetcher, MediaRef, media_client
from loomserve.modalities.media_embeds import DISABLED as EMBEDS_DISABLED
from loomserve.modalities.media_embeds import media_embeds_data
from loomserve.modalities.processor_cache import ProcessorCache, charges_between, media_key
from loomserve.modalities.processors.base import ProcessedItem
from loomserve.modalities.uuid_cache import MediaUUIDCache
from loomserve.platform.models.registry import create_processor

if TYPE_CHECKING:
    import httpx

# Decoding (and local reads) of the server's media: a pool of its own, so media work never waits behind the front
# end's tokenizing, nor the other way round. Downloads take no thread at all.
_MEDIA_POOL = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="loomserve-media")


def as_item_list(value: Any) -> list[Any]:
    """A `multi_modal_data` value: one item or a list of items (a tuple is one audio or one (frames, meta))."""
    return list(value) if isinstance(value, list) else [value]


class MultiModalFrontend:
    def __init__(self, model_config: Any, tokenizer: Any, mm_config: MultiModalConfig) -> None:
        self.mm_config = mm_config
        self.processor = create_processor(model_config, tokenizer, mm_config)
        self.encoder_cache_capacity = encoder_cache_capacity(model_config, mm_config)  # embeddings
        self._client: httpx.AsyncClient | None = None  # the server's media downloads, made on first use
        self.by_uuid = MediaUUIDCache()
        self.cache = ProcessorCache(mm_config.processor_cache_bytes)
        self.enable_mm_embeds = model_config.enable_mm_embeds

    def load(self, refs: list[MediaRef], budget: MediaBudget = MediaBudget()) -> dict[str, list[Any]]:
        """Fetch, decode and preprocess chat media under the allow-lists and limits (blocking: the Python API)."""
        self._require_processor(refs[0].modality)
        self._check_refs(refs)
        cached = self.by_uuid.cached(refs)
        spend = MediaSpend(budget)
        reads = [ref for i, ref in enumerate(refs) if i not in cached]
        fetcher = MediaFetcher(self.mm_config, spend)
        loaded = self.process_all(reads, [fetcher.read(ref) for ref in reads], spend)
        return self.by_uuid.merge(refs, loaded, cached)

    async def load_async(self, refs: list[MediaRef], budget: MediaBudget) -> dict[str, list[Any]]:
        """`load` for the server: the items are fetched at once (http(s) without a thread), all within the budget's
        deadline, then decoded and preprocessed on the media pool, so slow hosts hold no thread that other requests
        need."""
        self._require_processor(refs[0].modality)
        self._check_refs(refs)
        cached = self.by_uuid.cached(refs)
        spend = MediaSpend(budget)
        fetcher = MediaFetcher(self.mm_config, spend)
        if self._client is None:
            self._client = media_client()
        to_read = [ref for i, ref in enumerate(refs) if i not in cached]
        data = await _all_within(budget.deadline_s, [fetcher.read_async(ref, _MEDIA_POOL, self._client)
                                                     for ref in to_read])
        loaded = await asyncio.get_running_loop().run_in_executor(
            _MEDIA_POOL, self.process_all, to_read, data, spend)
        return self.by_uuid.merge(refs, loaded, cached)

    def process_all(self, refs: list[MediaRef], data: list[bytes], spend: MediaSpend) -> dict[str, list[ProcessedItem]]:
        """Each reference's item, taken from the processor cache or processed from its bytes, grouped by modality in
        the order given. Every item is found or decoded before any is processed, so a request over its budget (charged
        from each header) is refused before its first item costs a resize."""
        found = [self._found_or_decoded(ref, raw, spend) for ref, raw in zip(refs, data, strict=True)]
        loaded: dict[str, list[ProcessedItem]] = {}
        for ref, item in zip(refs, found, strict=True):
            if isinstance(item, _Decoded):
                decoded, item = item, self.processor.process(ref.modality, item.media)
                self.cache.put(decoded.key, item, decoded.charges)
            loaded.setdefault(ref.modality, []).append(item)
        return loaded

    def _found_or_decoded(self, ref: MediaRef, raw: bytes, spend: MediaSpend) -> ProcessedItem | _Decoded:
        if ref.embeds is not None:  # given embeddings are checked whole each time (their grid is not in `raw`)
            return self.processor.process(ref.modality, self.processor.decode(ref, raw, spend))
        key = media_key(ref, raw)
        item = self.cache.get(key, spend)
        if item is not None:
            return item
        before = dict(spend.spent)
        media = self.processor.decode(ref, raw, spend)
        return _Decoded(key, media, charges_between(before, spend.spent))

    def apply(self, token_ids: list[int], mm_data: dict[str, Any]) -> tuple[list[int], list[MultiModalItem]]:
        """Expand each placeholder of `token_ids` for the items of `mm_data` (one item or a list per modality)."""
        self._require_processor(", ".join(mm_data))
        mm_data = media_embeds_data(self.processor, mm_data, self.enable_mm_embeds)
        token_ids, items = self.processor.apply(token_ids, {m: as_item_list(v) for m, v in mm_data.items()})
        capacity = self.encoder_cache_capacity
        for item in items:
            if item.placeholder.length > capacity:
                raise MediaError(f"the {item.modality} needs {item.placeholder.length} embeddings, more than the "
                                 f"{capacity} the encoder cache holds (raise encoder_cache_memory)")
        return token_ids, items

    def _check_refs(self, refs: list[MediaRef]) -> None:
        """The processor's count checks, and embeddings parts refused before decoding when the engine takes none."""
        if not self.enable_mm_embeds and any(ref.embeds is not None for ref in refs):
            raise MediaError(EMBEDS_DISABLED)
        self.processor.check_refs(refs)

    def _require_processor(self, modality: str) -> None:
        if self.processor is None:
            raise MediaError(f"this model accepts text only; it cannot take {modality} input")


@dataclass
class _Decoded:
    """A media item decoded, not yet processed, with its processor-cache key and what decoding it charged."""

    key: str
    media: Any
    charges: dict[str, float]


async def _all_within(seconds: float, reads: list[Coroutine[Any, Any, bytes]]) -> list[bytes]:
    """Every read's bytes, in order; MediaError once `seconds` pass. The first failure cancels the other reads."""
    tasks = [asyncio.ensure_future(read) for read in reads]
    try:
        return await asyncio.wait_for(asyncio.gather(*tasks), seconds)
    except asyncio.TimeoutError:
        raise MediaError(f"loading this request's media took longer than the server's limit of {seconds:g} s") from None
    finally:
        for task in tasks:
            task.cancel()

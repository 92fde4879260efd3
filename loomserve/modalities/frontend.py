"""The front end's multimodal step: media from `multi_modal_data` or chat content parts -> expanded prompt
token ids and processed items, checked against what the model takes, the limits and the encoder cache."""

from __future__ import annotations

from typing import Any

from loomserve.modalities.config import MultiModalConfig
from loomserve.modalities.encoder_cache import encoder_cache_capacity
from loomserve.modalities.inputs import MultiModalItem
from loomserve.modalities.media import MediaError, MediaFetcher, MediaRef
from loomserve.platform.models.registry import create_processor


def as_item_list(value: Any) -> list[Any]:
    """A `multi_modal_data` value: one item or a list of items (a tuple is one audio or one (frames, meta))."""
    return list(value) if isinstance(value, list) else [value]


class MultiModalFrontend:
    def __init__(self, model_config: Any, tokenizer: Any, mm_config: MultiModalConfig) -> None:
        self.mm_config = mm_config
        self.processor = create_processor(model_config, tokenizer, mm_config)
        self.encoder_cache_capacity = encoder_cache_capacity(model_config, mm_config)  # embeddings

    def load(self, refs: list[MediaRef]) -> dict[str, list[Any]]:
        """Fetch and decode chat media under the allow-lists and limits."""
        self._require_processor(refs[0].modality)
        return self.processor.load_all(refs, MediaFetcher(self.mm_config))

    def apply(self, token_ids: list[int], mm_data: dict[str, Any]) -> tuple[list[int], list[MultiModalItem]]:
        """Expand each placeholder of `token_ids` for the items of `mm_data` (one item or a list per modality)."""
        self._require_processor(", ".join(mm_data))
        token_ids, items = self.processor.apply(token_ids, {m: as_item_list(v) for m, v in mm_data.items()})
        capacity = self.encoder_cache_capacity
        for item in items:
            if item.placeholder.length > capacity:
                raise MediaError(f"the {item.modality} needs {item.placeholder.length} embeddings, more than the "
                                 f"{capacity} the encoder cache holds (raise encoder_cache_memory)")
        return token_ids, items

    def _require_processor(self, modality: str) -> None:
        if self.processor is None:
            raise MediaError(f"this model accepts text only; it cannot take {modality} input")

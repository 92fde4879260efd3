"""What flows from the front end to the engine for each media item.

A `MultiModalItem` is one image, video or audio clip after preprocessing: its modality, the SHA-256 of
its content (the encoder-cache and prefix-cache key), where its placeholder tokens sit in the prompt,
and the tensors its encoder consumes (which cross processes as raw bytes, `platform/wire.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class PlaceholderRange:
    """The item's embeddings replace prompt tokens [offset, offset + length)."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


PROMPT_EMBEDS = "embeds"  # the modality of a prompt_embeds item (platform/prompt_embeds.py): rows, not media


@dataclass
class MultiModalItem:
    modality: str  # "image" | "video" | "audio", or PROMPT_EMBEDS
    content_hash: str  # hex SHA-256 over the modality, processing settings and content
    placeholder: PlaceholderRange
    data: dict[str, torch.Tensor] = field(default_factory=dict)  # what the encoder consumes (see each processor)
    meta: dict[str, float] = field(default_factory=dict)  # scalars the model needs besides tensors (e.g. video fps)

    @property
    def is_prompt_embeds(self) -> bool:
        return self.modality == PROMPT_EMBEDS

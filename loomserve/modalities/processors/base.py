"""The per-model processor contract: raw media + a prompt with one placeholder token per item in, the
prompt with each placeholder expanded to the item's embedding count and the processed items out."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loomserve.modalities.audio import decode_audio
from loomserve.modalities.budget import MediaSpend
from loomserve.modalities.config import MultiModalConfig
from loomserve.modalities.image import decode_image
from loomserve.modalities.inputs import MultiModalItem, PlaceholderRange
from loomserve.modalities.media import MediaError, MediaRef
from loomserve.modalities.media_embeds import MediaEmbeds, decode_embeds_part, embeds_item
from loomserve.modalities.video import decode_jpeg_frames, decode_video, is_jpeg_frames


@dataclass
class ProcessedItem:
    """One item after preprocessing, before its place in the prompt is known."""

    data: dict[str, torch.Tensor]
    num_tokens: int
    content_hash: str
    meta: dict[str, float]


def read_json(model: str, name: str) -> dict[str, Any]:
    """A processor config file of a checkpoint folder or hub id ({} when it has none)."""
    from transformers.utils import cached_file

    path = cached_file(model, name, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)
    return json.loads(Path(path).read_text()) if path else {}


class MultiModalProcessor:
    """Subclasses set `placeholders` (modality -> the prompt text of one item, whose `placeholder_tokens`
    token is expanded) and implement `process_item`."""

    placeholders: dict[str, str] = {}
    placeholder_tokens: dict[str, str] = {}
    video_sampling: dict[str, Any] = {}  # decode_video's sampling arguments, for models that take video
    takes_embeds = True  # items may come as the encoder's output (--enable-mm-embeds)

    def __init__(self, model_path: str, hf_config: Any, tokenizer: Any, mm_config: MultiModalConfig) -> None:
        self.model_path = model_path
        self.hf_config = hf_config
        self.mm_config = mm_config
        self.token_ids = {m: tokenizer.convert_tokens_to_ids(t) for m, t in self.placeholder_tokens.items()}

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.placeholders)

    def process_item(self, modality: str, item: Any) -> ProcessedItem:
        raise NotImplementedError

    def process(self, modality: str, item: Any) -> ProcessedItem:
        """`process_item` for an item not processed yet (chat media arrive processed from the front end's load),
        or for precomputed embeddings (--enable-mm-embeds) the checked item of their rows."""
        if isinstance(item, ProcessedItem):
            return item
        return embeds_item(self, item) if isinstance(item, MediaEmbeds) else self.process_item(modality, item)

    def embeds_extras(self, modality: str, num_rows: int, extras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What an embeddings item of `num_rows` rows carries besides them, checked; models that need more than the
        rows (Qwen2-VL's grid) override this."""
        if extras:
            raise MediaError(f"this model takes no {', '.join(extras)} with {modality}_embeds")
        return {}

    def grid_tokens(self, grid: torch.Tensor) -> int:
        """The placeholder tokens of an item of patch grid [3] (t, h, w), for models whose items have one."""
        raise MediaError("this model's items have no grid: give embeddings without *_grid_thw")

    def decode(self, ref: MediaRef, data: bytes, spend: MediaSpend) -> Any:
        """A chat content part's encoded media, decoded into what `process_item` takes, charged to `spend`."""
        if ref.embeds is not None:
            return decode_embeds_part(self, ref)
        max_pixels = self.mm_config.max_image_pixels
        if ref.modality == "image":
            return decode_image(data, max_pixels, spend)
        if ref.modality == "audio":
            return decode_audio(data, ref.format, spend)
        if is_jpeg_frames(ref.url):  # the frames' boundaries are in the URL, not in the bytes read
            return decode_jpeg_frames(ref.url, max_pixels, spend)
        return decode_video(data, max_pixels, **self.video_sampling, spend=spend)

    def check_refs(self, refs: list[MediaRef]) -> None:
        """`check_counts` of the references, before any is read."""
        counts: dict[str, int] = {}
        for ref in refs:
            counts[ref.modality] = counts.get(ref.modality, 0) + 1
        self.check_counts(counts)

    def check_counts(self, counts: dict[str, int]) -> None:
        """MediaError when a modality is not served or over the per-prompt limit (before any loading)."""
        for modality, n in counts.items():
            if modality not in self.placeholders:
                accepted = ", ".join(self.modalities)
                raise MediaError(f"this model does not accept {modality} input (it accepts {accepted} and text)")
            if n > self.mm_config.limit(modality):
                raise MediaError(f"at most {self.mm_config.limit(modality)} {modality} item(s) may be given in one "
                                 f"prompt, got {n}")

    def apply(self, token_ids: Sequence[int], mm_data: dict[str, list[Any]]) -> tuple[list[int], list[MultiModalItem]]:
        """Expand each placeholder token into its item's tokens, in prompt order; items of a modality are taken
        in the order given."""
        self.check_counts({m: len(items) for m, items in mm_data.items()})
        by_token = {self.token_ids[m]: m for m in self.modalities}
        found: dict[str, int] = {m: 0 for m in self.modalities}
        for t in token_ids:
            if t in by_token:
                found[by_token[t]] += 1
        for modality in self.modalities:
            given = len(mm_data.get(modality, []))
            if found[modality] != given:
                raise MediaError(f"the prompt has {found[modality]} {modality} placeholder(s) "
                                 f"({self.placeholder_tokens[modality]}) but {given} {modality} item(s) were given")
        processed = {m: [self.process(m, x) for x in items] for m, items in mm_data.items()}
        out: list[int] = []
        items: list[MultiModalItem] = []
        used = {m: 0 for m in self.modalities}
        for t in token_ids:
            modality = by_token.get(t)
            if modality is None:
                out.append(t)
                continue
            p = processed[modality][used[modality]]
            used[modality] += 1
            items.append(MultiModalItem(modality, p.content_hash, PlaceholderRange(len(out), p.num_tokens),
                                        p.data, p.meta))
            out.extend([t] * p.num_tokens)
        return out, items


"""Precomputed media embeddings (vLLM's `image_embeds` / `audio_embeds`, behind `--enable-mm-embeds`): an item given
as its encoder's output, [num_tokens, hidden] in the decoder's hidden size, in place of the media.

Such an item is processed like media (its placeholder expands to one token per row, its content hash over dtype,
shape and bytes keys the encoder and prefix caches) but carries its rows under `EMBEDS` instead of pixels or
features; the runner takes them as they are where it would run the encoder (`encode_items`). Qwen2-VL also needs
each image's `image_grid_thw` for its M-RoPE positions, as in vLLM's dict form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from loomserve.modalities.hashing import content_hash
from loomserve.modalities.media import MediaError

if TYPE_CHECKING:
    from torch import nn

    from loomserve.modalities.inputs import MultiModalItem
    from loomserve.modalities.media import MediaRef
    from loomserve.modalities.processors.base import MultiModalProcessor, ProcessedItem

EMBEDS = "embeds"  # the item data key of precomputed rows [num_tokens, hidden]
MODALITIES = ("image", "audio")
DISABLED = ("image_embeds and audio_embeds need the server started with --enable-mm-embeds "
            "(LLM(enable_mm_embeds=True))")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class MediaEmbeds:
    """One item's embeddings as the client gave them: rows [num_tokens, hidden], and extras the model needs to place
    them (Qwen2-VL: `image_grid_thw` [3])."""

    modality: str
    rows: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def is_embeds_value(value: Any) -> bool:
    """Whether a `multi_modal_data` value holds embeddings: a tensor, or vLLM's dict form {"image_embeds": ...}."""
    return isinstance(value, (torch.Tensor, MediaEmbeds)) or (
        isinstance(value, dict) and any(k.endswith("_embeds") for k in value))


def split_embeds(processor: MultiModalProcessor, modality: str, value: Any) -> list[MediaEmbeds]:
    """A `multi_modal_data` value of embeddings as items: [n, hidden] is one item, [k, n, hidden] k items; the dict
    form {"<modality>_embeds": rows, "<modality>_grid_thw": [k, 3]} cuts concatenated rows at each grid's tokens."""
    if isinstance(value, MediaEmbeds):
        return [value]
    if isinstance(value, torch.Tensor):
        return [MediaEmbeds(modality, t) for t in (value.unbind(0) if value.dim() == 3 else [value])]
    if not isinstance(value, dict) or not isinstance(value.get(f"{modality}_embeds"), torch.Tensor):
        raise MediaError(f"{modality} embeddings must be a tensor or {{'{modality}_embeds': tensor, ...}}")
    rows = value[f"{modality}_embeds"]
    grids = value.get(f"{modality}_grid_thw")
    if grids is None:
        return split_embeds(processor, modality, rows)
    grids = _tensor(grids, f"{modality}_grid_thw").to(torch.int64).reshape(-1, 3)
    counts = [processor.grid_tokens(g) for g in grids]
    if rows.dim() != 2 or sum(counts) != rows.shape[0]:
        raise MediaError(f"{modality}_embeds has shape {list(rows.shape)}; {modality}_grid_thw {grids.tolist()} "
                         f"needs [{sum(counts)}, hidden]")
    return [MediaEmbeds(modality, r, {"grid_thw": g}) for r, g in zip(rows.split(counts), grids, strict=True)]


def media_embeds_data(processor: MultiModalProcessor, mm_data: dict[str, Any], enabled: bool) -> dict[str, Any]:
    """`multi_modal_data` with each embeddings value as a list of `MediaEmbeds` (media values as given); MediaError
    for embeddings when the engine does not take them, or of a modality that has no embeddings form."""
    out = {}
    for modality, value in mm_data.items():
        items = value if isinstance(value, list) else [value]
        if not any(is_embeds_value(v) for v in items):
            out[modality] = value
            continue
        if not enabled:
            raise MediaError(DISABLED)
        if modality not in MODALITIES:
            raise MediaError(f"{modality} cannot be given as embeddings (only {', '.join(MODALITIES)})")
        if not processor.takes_embeds:
            raise MediaError(f"this model takes no {modality} embeddings, only {modality} itself")
        out[modality] = [e for v in items
                         for e in (split_embeds(processor, modality, v) if is_embeds_value(v) else [v])]
    return out


def decode_embeds_part(processor: MultiModalProcessor, ref: MediaRef) -> MediaEmbeds:
    """A chat part's embeddings (vLLM's wire form: base64 of a `torch.save`d tensor, or a dict of such, e.g.
    {"image_embeds": ..., "image_grid_thw": ...}) as one item; MediaError for anything else."""
    from loomserve.platform.prompt_embeds import decode_prompt_embeds

    given = ref.embeds if isinstance(ref.embeds, dict) else {f"{ref.modality}_embeds": ref.embeds}
    decoded = {}
    for key, encoded in given.items():
        if not isinstance(encoded, str):
            raise MediaError(f"{ref.modality}_embeds: {key} must be a base64 string of a torch.save'd tensor")
        try:
            decoded[key] = decode_prompt_embeds(encoded)
        except ValueError as exc:
            raise MediaError(f"{key}: {str(exc).removeprefix('prompt_embeds ')}") from None
    items = split_embeds(processor, ref.modality, decoded)
    if len(items) != 1:
        raise MediaError(f"a {ref.modality}_embeds part holds one {ref.modality}, got {len(items)}")
    return items[0]


def embeds_item(processor: MultiModalProcessor, given: MediaEmbeds) -> ProcessedItem:
    """A checked item of precomputed rows: dense [num_tokens, hidden] in the decoder's hidden size, finite, and
    what the processor's model needs besides (`processor.embeds_extras`)."""
    from loomserve.modalities.processors.base import ProcessedItem

    hidden = processor.hf_config.get_text_config().hidden_size
    rows = _tensor(given.rows, f"{given.modality}_embeds")
    if rows.dtype not in _DTYPES:
        raise MediaError(f"{given.modality}_embeds must be float32, float16 or bfloat16, got {rows.dtype}")
    rows = rows.to_dense()
    if rows.dim() == 3 and rows.shape[0] == 1:
        rows = rows.squeeze(0)
    if rows.dim() != 2 or rows.shape[0] == 0 or rows.shape[1] != hidden:
        raise MediaError(f"{given.modality}_embeds must have shape [num_tokens, {hidden}] (this model's hidden "
                         f"size), got {list(rows.shape)}")
    if not torch.isfinite(rows).all():
        raise MediaError(f"{given.modality}_embeds holds NaN or infinite values")
    extras = processor.embeds_extras(given.modality, rows.shape[0], given.extras)
    raw = rows.view(torch.int16) if rows.dtype == torch.bfloat16 else rows  # numpy has no bfloat16
    settings = {"dtype": str(rows.dtype), **{k: v.tolist() for k, v in extras.items()}}
    return ProcessedItem(data={EMBEDS: rows.contiguous(), **extras}, num_tokens=rows.shape[0],
                         content_hash=content_hash(f"{given.modality}_{EMBEDS}", settings, raw.numpy()), meta={})


def encode_items(model: nn.Module, modality: str, items: list[MultiModalItem]) -> list[torch.Tensor]:
    """The embeddings of each item, in order: the encoder's output for media, the given rows for embeddings items
    (which never reach the encoder)."""
    media = [item for item in items if EMBEDS not in item.data]
    encoded = iter(model.encode(modality, media) if media else [])
    return [item.data[EMBEDS] if EMBEDS in item.data else next(encoded) for item in items]


def _tensor(value: Any, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise MediaError(f"{name} must be a tensor, got {type(value).__name__}")
    return value

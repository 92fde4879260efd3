"""Chat messages with media content parts (the OpenAI shapes vLLM accepts) -> prompt text and media references.

Parts: `{"type": "text", "text": ...}`, `{"type": "image_url", "image_url": {"url": ...}}`,
`{"type": "video_url", "video_url": {"url": ...}}`, `{"type": "audio_url", "audio_url": {"url": ...}}` and
`{"type": "input_audio", "input_audio": {"data": base64, "format": "wav"}}`; with --enable-mm-embeds also
`{"type": "image_embeds", "image_embeds": base64 | {"image_embeds": base64, "image_grid_thw": base64}}` and
`audio_embeds` (`media_embeds.py`). Media parts reach the chat
template as `{"type": "image", "image": <url>}` (or video, audio: templates test either key), which
multimodal templates turn into the model's placeholder; for a template that does not, each media part's
placeholder is written into the message text instead, one part per line.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from loomserve.modalities.media import MediaError, MediaRef

if TYPE_CHECKING:
    from loomserve.modalities.processors.base import MultiModalProcessor

PART_MODALITIES = {"image_url": "image", "video_url": "video", "audio_url": "audio", "input_audio": "audio",
                   "image_embeds": "image", "audio_embeds": "audio"}


def media_ref(part: dict[str, Any]) -> MediaRef:
    kind = part["type"]
    value = part.get(kind)
    uuid = part.get("uuid")
    if uuid is not None and not isinstance(uuid, str):
        raise MediaError(f"a {kind} part's uuid must be a string")
    if uuid and not value:  # `"image_url": {}` or null: the item sent before under this uuid
        return MediaRef(PART_MODALITIES[kind], uuid=uuid)
    ref = _media_ref(kind, value)
    return dataclasses.replace(ref, uuid=uuid) if uuid else ref


def _media_ref(kind: str, value: Any) -> MediaRef:
    if kind.endswith("_embeds"):  # checked and decoded with the other media, off the event loop
        return MediaRef(PART_MODALITIES[kind], embeds=value)
    if kind == "input_audio":
        if not isinstance(value, dict) or not isinstance(value.get("data"), str):
            raise MediaError('an input_audio part needs {"data": <base64>, "format": "wav" | "mp3" | ...}')
        return MediaRef("audio", data=value["data"], format=value.get("format"))
    if not isinstance(value, dict):  # OpenAI's and vLLM's shape: an object, never a bare URL
        raise MediaError(f'a {kind} part needs an object {{"url": ...}}, got {type(value).__name__}')
    url = value.get("url")
    if not isinstance(url, str) or not url:
        raise MediaError(f'a {kind} part needs {{"url": ...}}')
    return MediaRef(PART_MODALITIES[kind], url=url)


def split_media(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[MediaRef]]:
    """Messages whose parts are text or `{"type": modality}`, and the media references in prompt order."""
    out, refs = [], []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for part in content:
            kind = part.get("type")
            if kind in PART_MODALITIES:
                ref = media_ref(part)
                refs.append(ref)
                parts.append({"type": ref.modality, ref.modality: ref.url or ref.uuid or kind})
            elif kind == "text":
                if not isinstance(part.get("text"), str):
                    raise MediaError("A content part of type 'text' needs a `text` field")
                parts.append({"type": "text", "text": part["text"]})
            else:
                raise MediaError(f"content parts of type {kind!r} are not supported")
        out.append({**message, "content": parts})
    return out, refs


def render_chat_with_media(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    refs: list[MediaRef],
    processor: MultiModalProcessor | None,
    add_generation_prompt: bool = True,
    template_kwargs: dict[str, Any] | None = None,
    content_format: str = "string",
) -> str:
    """The prompt text for `split_media`'s messages, with one placeholder per media reference; MediaError first
    when the model does not take the media or the prompt has more than the limits allow. The one way chat
    messages become a prompt, for text and media, offline and over HTTP; `content_format` "openai" hands the
    template text parts as lists, "string" as one text."""
    render = lambda msgs: tokenizer.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=add_generation_prompt, **(template_kwargs or {})
    )
    if not refs:  # text parts only: each message's parts as one text, a part a line (or kept as parts: `openai`)
        return render([_joined(message) for message in messages] if content_format == "string" else messages)
    if processor is None:
        raise MediaError(f"this model accepts text only; it cannot take {refs[0].modality} input")
    wanted = {m: sum(r.modality == m for r in refs) for m in {r.modality for r in refs}}
    processor.check_counts(wanted)
    text = render(messages)
    if all(text.count(processor.placeholder_tokens[m]) == n for m, n in wanted.items()):
        return text
    inline = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            lines = [p["text"] if p["type"] == "text" else processor.placeholders[p["type"]] for p in content]
            message = {**message, "content": "\n".join(lines)}
        inline.append(message)
    return render(inline)


def _joined(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if isinstance(content, list):
        return {**message, "content": "\n".join(part["text"] for part in content)}
    return {**message, "content": content or ""}

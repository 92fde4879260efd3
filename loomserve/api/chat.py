"""Chat messages of text-only models -> prompt text through the tokenizer's chat template; media parts are refused
here (multimodal models render through chat_media.py)."""

from __future__ import annotations

from typing import Any

import jinja2

from loomserve.api.errors import APIError
from loomserve.api.protocol import ChatMessage, ContentPart


def render_chat(tokenizer: Any, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
    """The prompt text the model sees for `messages`; APIError (400) when they cannot be rendered."""
    check_chat(tokenizer, messages)
    conversation = [_template_message(message) for message in messages]
    try:
        return tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except jinja2.TemplateError as exc:
        raise APIError(f"The chat template rejected these messages: {exc}", param="messages") from exc


def check_chat(tokenizer: Any, messages: list[ChatMessage]) -> None:
    """APIError (400) for an empty conversation or a model without a chat template."""
    if not messages:
        raise APIError("`messages` must not be empty", param="messages")
    if not getattr(tokenizer, "chat_template", None):
        raise APIError("This model has no chat template: use /v1/completions", param="messages")


def _template_message(message: ChatMessage) -> dict[str, str]:
    rendered = {"role": message.role, "content": _content_text(message.content)}
    if message.name is not None:
        rendered["name"] = message.name
    return rendered


def _content_text(content: str | list[ContentPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(_part_text(part) for part in content)


def _part_text(part: ContentPart) -> str:
    if part.type != "text":
        raise APIError(
            f"Content parts of type {part.type!r} are not supported: this model accepts text only",
            param="messages",
        )
    if part.text is None:
        raise APIError("A content part of type 'text' needs a `text` field", param="messages")
    return part.text

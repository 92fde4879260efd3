"""Chat messages of a request -> the engine prompt: rendered through the one chat-rendering path
(`modalities/chat.py`, for text and media alike), tokenized, media loaded and placeholders expanded, all off the
event loop. Every problem with the messages or their media answers 400 with its reason."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jinja2

from loomserve.api.errors import APIError
from loomserve.api.offload import offload
from loomserve.api.prompts import Prompt, encode_fitting
from loomserve.api.protocol import ChatMessage
from loomserve.modalities.budget import MediaBudget
from loomserve.modalities.chat import render_chat_with_media, split_media
from loomserve.modalities.media import MediaError, MediaRef

if TYPE_CHECKING:
    from loomserve.modalities.processors.base import MultiModalProcessor
    from loomserve.platform.async_llm import AsyncLLM


def render_chat(tokenizer: Any, messages: list[ChatMessage], processor: MultiModalProcessor | None,
                add_generation_prompt: bool = True) -> tuple[str, list[MediaRef]]:
    """The prompt text the model sees for `messages` and their media references; APIError (400) when they cannot
    be rendered (no chat template, media the model does not take, a template that rejects them)."""
    if not messages:
        raise APIError("`messages` must not be empty", param="messages")
    if not getattr(tokenizer, "chat_template", None):
        raise APIError("This model has no chat template: use /v1/completions", param="messages")
    try:
        conversation, refs = split_media([m.model_dump(exclude_none=True) for m in messages])
        return render_chat_with_media(tokenizer, conversation, refs, processor, add_generation_prompt), refs
    except MediaError as exc:
        raise APIError(str(exc), param="messages") from exc
    except jinja2.TemplateError as exc:
        raise APIError(f"The chat template rejected these messages: {exc}", param="messages") from exc


async def chat_prompt(engine: AsyncLLM, messages: list[ChatMessage], media_budget: MediaBudget,
                      add_generation_prompt: bool = True, add_special_tokens: bool = False) -> Prompt:
    """The engine prompt for `messages`: token ids, text, and the media items in place (all of them within
    `media_budget`)."""
    mm = engine.input_processor.mm
    text, refs = await offload(render_chat, engine.tokenizer, messages, mm.processor, add_generation_prompt)
    token_ids = await offload(encode_fitting, engine, text, "messages", add_special_tokens=add_special_tokens)
    if not refs:
        return Prompt(token_ids, text)
    try:
        mm_data = await mm.load_async(refs, media_budget)
        token_ids, items = await offload(mm.apply, token_ids, mm_data)
    except MediaError as exc:
        raise APIError(str(exc), param="messages") from exc
    return Prompt(token_ids, text, items)


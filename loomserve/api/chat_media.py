"""Chat prompts of multimodal models for the HTTP routes: content parts -> prompt text, media loaded and
preprocessed off the event loop, placeholders expanded. Every media problem answers 400 with its reason."""

from __future__ import annotations

import asyncio

import jinja2

from loomserve.api.chat import check_chat, render_chat
from loomserve.api.errors import APIError
from loomserve.api.prompts import Prompt
from loomserve.api.protocol import ChatMessage
from loomserve.modalities.chat import render_chat_with_media, split_media
from loomserve.modalities.media import MediaError
from loomserve.platform.async_llm import AsyncLLM


async def chat_prompt(engine: AsyncLLM, messages: list[ChatMessage]) -> Prompt:
    """The engine prompt for `messages`: text-only models render as before (refusing media parts)."""
    mm = engine.input_processor.mm
    if mm.processor is None:
        text = render_chat(engine.tokenizer, messages)
        return Prompt(engine.tokenizer.encode(text, add_special_tokens=False), text)
    check_chat(engine.tokenizer, messages)
    try:
        conversation, refs = split_media([m.model_dump(exclude_none=True) for m in messages])
        text = render_chat_with_media(engine.tokenizer, conversation, refs, mm.processor)
        token_ids = engine.tokenizer.encode(text, add_special_tokens=False)
        mm_data = await asyncio.to_thread(mm.load, refs) if refs else {}
        token_ids, items = await asyncio.to_thread(mm.apply, token_ids, mm_data)
    except MediaError as exc:
        raise APIError(str(exc), param="messages") from exc
    except jinja2.TemplateError as exc:
        raise APIError(f"The chat template rejected these messages: {exc}", param="messages") from exc
    return Prompt(token_ids, text, items)

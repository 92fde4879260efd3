"""Chat `messages` of a pooling request -> one pooling prompt, as vLLM's /v1/embeddings takes them: the text parts
joined by newlines (image-text embedding models such as CLIP have no chat template), the media parts fetched and
decoded off the event loop under the allow-lists and limits, as `multi_modal_data`."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from loomserve.api.errors import APIError
from loomserve.api.protocol import ChatMessage
from loomserve.modalities.chat import split_media
from loomserve.modalities.media import MediaError
from loomserve.pooling.inputs import PoolingPrompt

if TYPE_CHECKING:
    from loomserve.platform.async_llm import AsyncLLM


async def messages_prompt(engine: AsyncLLM, messages: list[ChatMessage]) -> PoolingPrompt:
    """`{"prompt": text}`, with `"multi_modal_data"` when the messages carry media; 400 for media the model cannot
    take or cannot be loaded."""
    if not messages:
        raise APIError("`messages` must not be empty", param="messages")
    try:
        conversation, refs = split_media([m.model_dump(exclude_none=True) for m in messages])
        texts = []
        for message in conversation:
            content = message.get("content") or ""
            parts = [content] if isinstance(content, str) else [p["text"] for p in content if p["type"] == "text"]
            texts.extend(parts)
        prompt: PoolingPrompt = {"prompt": "\n".join(texts)}
        if refs:
            prompt["multi_modal_data"] = await asyncio.to_thread(engine.input_processor.mm.load, refs)
    except MediaError as exc:
        raise APIError(str(exc), param="messages") from exc
    return prompt

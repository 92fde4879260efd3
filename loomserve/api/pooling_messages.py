"""Chat `messages` of a pooling request -> one pooling prompt, as vLLM's /v1/embeddings and /classify take them:
rendered with the model's chat template when it has one; otherwise (image-text embedding models such as CLIP) the
text parts joined by newlines. Media parts are fetched and decoded off the event loop under the allow-lists and
limits, as `multi_modal_data`."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from loomserve.api.chat import TemplateInputs, render_chat
from loomserve.api.errors import APIError
from loomserve.api.offload import offload
from loomserve.api.protocol import ChatMessage
from loomserve.modalities.chat import split_media
from loomserve.modalities.media import MediaError, MediaRef
from loomserve.pooling.inputs import PoolingPrompt

if TYPE_CHECKING:
    from loomserve.platform.async_llm import AsyncLLM


async def messages_prompt(engine: AsyncLLM, messages: list[ChatMessage],
                          add_generation_prompt: bool = False) -> tuple[PoolingPrompt, bool]:
    """`{"prompt": text}`, with `"multi_modal_data"` when the messages carry media, and whether a chat template
    rendered it (its text then holds the special tokens); 400 for messages or media the model cannot take."""
    if not messages:
        raise APIError("`messages` must not be empty", param="messages")
    templated = bool(getattr(engine.tokenizer, "chat_template", None))
    try:
        if templated:
            text, refs = await offload(render_chat, engine.tokenizer, messages, engine.input_processor.mm.processor,
                                       TemplateInputs(add_generation_prompt=add_generation_prompt))
        else:
            text, refs = _joined_text(messages)
        prompt: PoolingPrompt = {"prompt": text}
        if refs:
            prompt["multi_modal_data"] = await asyncio.to_thread(engine.input_processor.mm.load, refs)
    except MediaError as exc:
        raise APIError(str(exc), param="messages") from exc
    return prompt, templated


def _joined_text(messages: list[ChatMessage]) -> tuple[str, list[MediaRef]]:
    conversation, refs = split_media([m.model_dump(exclude_none=True) for m in messages])
    texts = []
    for message in conversation:
        content = message.get("content") or ""
        texts.extend([content] if isinstance(content, str) else [p["text"] for p in content if p["type"] == "text"])
    return "\n".join(texts), refs

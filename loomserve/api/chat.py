"""Chat messages of a request -> the engine prompt: rendered through the one chat-rendering path
(`modalities/chat.py`, for text and media alike) with the request's template inputs (tools, template kwargs,
generation prompt or continued final message), tokenized, media loaded and placeholders expanded, all off the
event loop. Every problem with the messages, their media or the template inputs answers 400 with its reason."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.nodes

from loomserve.api.errors import APIError
from loomserve.api.offload import offload
from loomserve.api.prompts import Prompt, encode_fitting
from loomserve.api.protocol import ChatMessage, ChatTemplateFields
from loomserve.modalities.budget import MediaBudget
from loomserve.modalities.chat import render_chat_with_media, split_media
from loomserve.modalities.media import MediaError, MediaRef
from loomserve.platform.skip_tokenizer import NO_TEXT, NoTokenizer

if TYPE_CHECKING:
    from loomserve.modalities.processors.base import MultiModalProcessor
    from loomserve.platform.async_llm import AsyncLLM

# apply_chat_template's own parameters: a request sets them through their fields, not chat_template_kwargs.
_RESERVED_KWARGS = frozenset({
    "conversation", "tools", "documents", "chat_template", "add_generation_prompt", "continue_final_message",
    "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
    "tokenizer_kwargs",
})


@dataclass
class TemplateInputs:
    """Everything the chat template gets besides the messages."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[dict[str, Any]] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)  # chat_template_kwargs (and reasoning_effort)
    content_format: str = "auto"  # --chat-template-content-format

    @classmethod
    def of(cls, request: ChatTemplateFields, content_format: str = "auto") -> TemplateInputs:
        """A request's template inputs; APIError (400) for a combination vLLM refuses."""
        if request.continue_final_message and request.add_generation_prompt:
            raise APIError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                           param="continue_final_message")
        kwargs = dict(request.chat_template_kwargs or {})
        reserved = sorted(_RESERVED_KWARGS & kwargs.keys())
        if reserved:
            raise APIError(f"`chat_template_kwargs` must not set `{reserved[0]}`: it is a request field of its own",
                           param="chat_template_kwargs")
        effort = getattr(request, "reasoning_effort", None)
        if effort is not None:
            kwargs["reasoning_effort"] = effort
        tools = [tool.model_dump(exclude_none=True) for tool in request.tools] if request.tools else None
        return cls(request.add_generation_prompt, request.continue_final_message, tools, kwargs, content_format)

    def apply_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `apply_chat_template` beyond the messages and the generation prompt."""
        extra = {"tools": self.tools} if self.tools else {}
        return {**self.kwargs, **extra, "continue_final_message": self.continue_final_message}


def render_chat(tokenizer: Any, messages: list[ChatMessage], processor: MultiModalProcessor | None,
                inputs: TemplateInputs | None = None) -> tuple[str, list[MediaRef]]:
    """The prompt text the model sees for `messages` and their media references; APIError (400) when they cannot
    be rendered (no chat template, media the model does not take, a template that rejects them)."""
    inputs = inputs or TemplateInputs()
    if not messages:
        raise APIError("`messages` must not be empty", param="messages")
    if isinstance(tokenizer, NoTokenizer):
        raise APIError(NO_TEXT, param="messages")
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise APIError("This model has no chat template: use /v1/completions", param="messages")
    content_format = inputs.content_format
    if content_format == "auto":
        content_format = detect_content_format(template) if isinstance(template, str) else "string"
    try:
        dumped = [_template_message(m.model_dump(exclude_none=True), content_format) for m in messages]
        conversation, refs = split_media(dumped)
        text = render_chat_with_media(tokenizer, conversation, refs, processor, inputs.add_generation_prompt,
                                      inputs.apply_kwargs(), content_format)
        return text, refs
    except MediaError as exc:
        raise APIError(str(exc), param="messages") from exc
    except jinja2.TemplateError as exc:
        raise APIError(f"The chat template rejected these messages: {exc}", param="messages") from exc
    except ValueError as exc:  # transformers' checks, e.g. a final message `continue_final_message` cannot find
        raise APIError(f"Cannot render these messages: {exc}", param="messages") from exc


def _template_message(message: dict[str, Any], content_format: str) -> dict[str, Any]:
    """A message as chat templates take it: tool-call arguments as objects (the transformers convention; OpenAI
    sends JSON text), and under the `openai` content format a string content as one text part."""
    if message.get("role") == "assistant" and isinstance(message.get("tool_calls"), list):
        message["tool_calls"] = [_with_parsed_arguments(call) for call in message["tool_calls"]]
    if content_format == "openai" and isinstance(message.get("content"), str):
        message["content"] = [{"type": "text", "text": message["content"]}]
    return message


def _with_parsed_arguments(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        raise APIError('each of `tool_calls` needs {"id", "type": "function", "function": {"name", "arguments"}}',
                       param="messages")
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise APIError(f"The arguments of tool call {call.get('id')!r} are not JSON: {exc}",
                           param="messages") from exc
    return {**call, "function": {**function, "arguments": arguments if arguments is not None else {}}}


@functools.lru_cache(maxsize=16)
def detect_content_format(template: str) -> str:
    """`openai` when the template loops over a message's content (`message.content` or `message['content']`: it
    takes lists of parts), else `string` (vLLM's `auto`)."""
    try:
        ast = jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError:
        return "string"
    for loop in ast.find_all(jinja2.nodes.For):
        target = loop.iter
        if isinstance(target, jinja2.nodes.Filter):  # e.g. `for part in message.content | list`
            target = target.node
        if isinstance(target, jinja2.nodes.Getattr) and target.attr == "content":
            return "openai"
        if isinstance(target, jinja2.nodes.Getitem) and getattr(target.arg, "value", None) == "content":
            return "openai"
    return "string"


async def chat_prompt(engine: AsyncLLM, messages: list[ChatMessage], media_budget: MediaBudget,
                      inputs: TemplateInputs | None = None, add_special_tokens: bool = False) -> Prompt:
    """The engine prompt for `messages`: token ids, text, and the media items in place (all of them within
    `media_budget`)."""
    mm = engine.input_processor.mm
    text, refs = await offload(render_chat, engine.tokenizer, messages, mm.processor, inputs)
    token_ids = await offload(encode_fitting, engine, text, "messages", add_special_tokens=add_special_tokens)
    if not refs:
        return Prompt(token_ids, text)
    try:
        mm_data = await mm.load_async(refs, media_budget)
        token_ids, items = await offload(mm.apply, token_ids, mm_data)
    except MediaError as exc:
        raise APIError(str(exc), param="messages") from exc
    return Prompt(token_ids, text, items)

"""The chat flags of `loomserve serve` (vLLM's names): how message content reaches the chat template, tool-call
parsing and reasoning parsing, and the options they make for /v1/chat/completions (ChatOptions)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from loomserve.api.reasoning import REASONING_PARSERS
from loomserve.api.tool_parsers import TOOL_PARSERS

CONTENT_FORMATS = ("auto", "string", "openai")


@dataclass
class ChatOptions:
    content_format: str = "auto"  # --chat-template-content-format
    tool_call_parser: str | None = None  # set only with --enable-auto-tool-choice: what tool_choice "auto" parses
    reasoning_parser: str | None = None


def add_chat_flags(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--chat-template-content-format", choices=CONTENT_FORMATS, default="auto",
                       help="message content as the chat template takes it: one string, or OpenAI's list of parts; "
                            "auto: detected from the template")
    group.add_argument("--enable-auto-tool-choice", action="store_true",
                       help='let the model call tools on its own (tool_choice "auto"); needs --tool-call-parser')
    group.add_argument("--tool-call-parser", choices=sorted(TOOL_PARSERS), default=None,
                       help="the model family's tool-call format, parsed into `tool_calls`")
    group.add_argument("--reasoning-parser", choices=sorted(REASONING_PARSERS), default=None,
                       help="split the model's reasoning into `reasoning_content` (and `reasoning`)")


def chat_options(ns: argparse.Namespace) -> ChatOptions:
    """ValueError for flags that do not go together."""
    if ns.enable_auto_tool_choice and ns.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (one of "
                         f"{', '.join(sorted(TOOL_PARSERS))})")
    return ChatOptions(ns.chat_template_content_format,
                       ns.tool_call_parser if ns.enable_auto_tool_choice else None, ns.reasoning_parser)

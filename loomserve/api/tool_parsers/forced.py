"""Tool calls that `tool_choice` forces through structured output, so no model format is involved (vLLM's shapes):
`required` generates a JSON list `[{"name": ..., "parameters": {...}}, ...]`; a named function generates its
arguments object alone."""

from __future__ import annotations

from typing import Any

from loomserve.api.tool_parsers.base import ParsedText, PartialCall, ToolParser
from loomserve.api.tool_parsers.json_scan import json_calls, skip_whitespace


class RequiredToolParser(ToolParser):
    def parse(self, text: str, final: bool) -> ParsedText:
        i = skip_whitespace(text, 0)
        if i == len(text):
            return ParsedText("", [PartialCall()] if final else [])
        if text[i] != "[":
            return ParsedText("", [PartialCall()])
        calls, _ = json_calls(text, i + 1, ",")
        return ParsedText("", calls)


class NamedToolParser(ToolParser):
    def __init__(self, tools: list[dict[str, Any]], name: str) -> None:
        super().__init__(tools)
        self.name = name

    def parse(self, text: str, final: bool) -> ParsedText:
        return ParsedText("", [PartialCall(self.name, text, complete=final)])

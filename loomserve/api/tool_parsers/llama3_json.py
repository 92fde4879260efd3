"""Llama 3.1/3.2 JSON tool calls (vLLM's `llama3_json`): the whole answer is `{"name": ..., "parameters": {...}}`
(or "arguments"), optionally after `<|python_tag|>`, several separated by `;`. An answer that does not open so is
content."""

from __future__ import annotations

from loomserve.api.tool_parsers.base import ParsedText, PartialCall, ToolParser
from loomserve.api.tool_parsers.json_scan import json_calls, skip_whitespace

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    def parse(self, text: str, final: bool) -> ParsedText:
        i = skip_whitespace(text, 0)
        if text.startswith(PYTHON_TAG, i):
            i = skip_whitespace(text, i + len(PYTHON_TAG))
        elif i == len(text) or PYTHON_TAG.startswith(text[i:]):
            return ParsedText(text if final else "")  # may still open a call
        if i == len(text):
            return ParsedText("", [PartialCall()])
        if text[i] != "{":
            return ParsedText(text)
        calls, other = json_calls(text, i, ";")
        if other is not None:
            calls.append(PartialCall())  # something that is no call: served as content once final
        return ParsedText("", calls)

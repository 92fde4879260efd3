"""Hermes / Qwen2.5 tool calls (vLLM's `hermes`): `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`,
one block per call, after any content (a last block left unclosed counts, as in vLLM)."""

from __future__ import annotations

from loomserve.api.tool_parsers.base import ParsedText, PartialCall, ToolParser, content_before
from loomserve.api.tool_parsers.json_scan import json_call, skip_whitespace

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    def parse(self, text: str, final: bool) -> ParsedText:
        content, start = content_before(text, START, final)
        parsed = ParsedText(content)
        while start >= 0:
            i = skip_whitespace(text, start + len(START))
            if i == len(text) or text[i] != "{":
                parsed.calls.append(PartialCall())  # not (yet) a call object
                break
            call, end = json_call(text, i)
            parsed.calls.append(call)
            if end is None:
                break
            closing = skip_whitespace(text, end)
            if not text.startswith(END, closing):
                break
            start = text.find(START, closing + len(END))
        return parsed

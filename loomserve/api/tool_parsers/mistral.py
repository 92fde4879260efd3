"""Mistral tool calls (vLLM's `mistral`): content, then `[TOOL_CALLS]` and either a JSON list of
`{"name": ..., "arguments": {...}}` (v3 tokenizers) or `name[ARGS]{...}` per call, each after its own
`[TOOL_CALLS]` (v11+). Call ids are nine letters and digits, the only ids Mistral's templates accept."""

from __future__ import annotations

import secrets
import string

from loomserve.api.tool_parsers.base import ParsedText, PartialCall, ToolParser, content_before
from loomserve.api.tool_parsers.json_scan import DECODER, json_calls, skip_whitespace

TOOL_CALLS, ARGS = "[TOOL_CALLS]", "[ARGS]"


class MistralToolParser(ToolParser):
    def parse(self, text: str, final: bool) -> ParsedText:
        content, start = content_before(text, TOOL_CALLS, final)
        parsed = ParsedText(content)
        if start < 0:
            return parsed
        i = skip_whitespace(text, start + len(TOOL_CALLS))
        if i < len(text) and text[i] == "[":
            calls, other = json_calls(text, i + 1, ",")
            closed = other is not None and text[other] == "]"
            parsed.calls = calls if other is None or closed else [*calls, PartialCall()]  # a broken list: content
            return parsed
        while start >= 0:
            call, start = _named_call(text, start + len(TOOL_CALLS))
            parsed.calls.append(call)
        return parsed

    def new_call_id(self) -> str:
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


def _named_call(text: str, i: int) -> tuple[PartialCall, int]:
    """`name[ARGS]{...}` from `text[i]`: the call and where the next `[TOOL_CALLS]` starts (-1: none)."""
    args_at = text.find(ARGS, i)
    if args_at < 0:
        return PartialCall(), -1
    call = PartialCall(name=text[i:args_at].strip() or None)
    begin = skip_whitespace(text, args_at + len(ARGS))
    try:
        _, end = DECODER.raw_decode(text, begin)
    except ValueError:
        call.arguments = text[begin:]
        return call, -1
    call.arguments, call.complete = text[begin:end], call.name is not None
    return call, text.find(TOOL_CALLS, end)

"""Qwen3-Coder XML tool calls (vLLM's `qwen3_xml`):

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

Parameter values are text, converted by the type the tool's JSON schema gives each parameter (string, integer,
number, boolean, or JSON for objects and arrays). Arguments stream one finished parameter at a time:
`{"city": "Paris"`, then `, "days": 3`, then `}` once the function closes.
"""

from __future__ import annotations

import json
import re
from typing import Any

from loomserve.api.tool_parsers.base import ParsedText, PartialCall, ToolParser, content_before

START = "<tool_call>"
_FUNCTION = re.compile(r"<function=([^>\n]+)>")
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)
_FUNCTION_END = "</function>"


class Qwen3XmlToolParser(ToolParser):
    def parse(self, text: str, final: bool) -> ParsedText:
        content, start = content_before(text, START, final)
        parsed = ParsedText(content)
        while start >= 0:
            call, start = self._call(text, start + len(START))
            parsed.calls.append(call)
        return parsed

    def _call(self, text: str, i: int) -> tuple[PartialCall, int]:
        """The call whose `<function=...>` follows `text[i]`, and where the next `<tool_call>` starts (-1: none)."""
        function = _FUNCTION.search(text, i)
        if function is None:
            return PartialCall(), -1
        name = function.group(1).strip()
        end = text.find(_FUNCTION_END, function.end())
        body = text[function.end(): end if end >= 0 else len(text)]
        types = self._parameter_types(name)
        fields = [_field(key.strip(), value, types) for key, value in _PARAMETER.findall(body)]
        arguments = "{" + ", ".join(fields)
        if end < 0:
            return PartialCall(name, arguments), -1
        return PartialCall(name, arguments + "}", complete=True), text.find(START, end)

    def _parameter_types(self, name: str) -> dict[str, Any]:
        for tool in self.tools:
            function = tool.get("function", {})
            if function.get("name") == name:
                properties = (function.get("parameters") or {}).get("properties") or {}
                return {key: spec.get("type") for key, spec in properties.items() if isinstance(spec, dict)}
        return {}


def _field(key: str, value: str, types: dict[str, Any]) -> str:
    """`"key": value` as json.dumps writes an object's items, so the streamed pieces join into its text."""
    return f"{json.dumps(key, ensure_ascii=False)}: {json.dumps(_convert(value, types.get(key)), ensure_ascii=False)}"


def _convert(value: str, kind: Any) -> Any:
    """A parameter's text as the JSON value its schema type names (vLLM's rules); text when the type is a string,
    unknown, or the text does not parse as that type."""
    try:
        if kind == "integer":
            return int(value.strip())
        if kind == "number":
            number = float(value.strip())
            return int(number) if number.is_integer() and "." not in value else number
        if kind == "boolean":
            return {"true": True, "false": False}[value.strip().lower()]
        if kind in ("object", "array"):
            return json.loads(value)
    except (ValueError, KeyError):
        pass
    return value

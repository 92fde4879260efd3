"""`tools` + `tool_choice` -> how a request's output is read, checked as vLLM checks them: `auto` parses the
model's own format (needs --enable-auto-tool-choice and --tool-call-parser), `required` and a named function force
their format through structured output (vLLM's JSON schemas), `none` reads plain content."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

from loomserve.api.errors import APIError
from loomserve.api.tool_parsers import TOOL_PARSERS, ToolParser
from loomserve.api.tool_parsers.forced import NamedToolParser, RequiredToolParser
from loomserve.platform.request import SamplingParams
from loomserve.platform.structured import StructuredOutputsParams


@dataclass
class ToolMode:
    """How one request's output is read for tool calls."""

    parser: ToolParser | None = None  # None: plain content
    schema: dict[str, Any] | None = None  # the JSON schema structured output enforces, when the choice forces one
    finish_reason: str | None = None  # what a finished output with tool calls reports ("tool_calls"; None: its own)


def tool_mode(tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None, auto_parser: str | None,
              parallel_tool_calls: bool = True) -> ToolMode:
    """The mode for a request's `tools` and `tool_choice` (OpenAI shapes); `auto_parser`: the --tool-call-parser
    when --enable-auto-tool-choice is on. APIError (400) for an inconsistent choice."""
    if not tools:
        if tool_choice is not None:
            raise APIError("When using `tool_choice`, `tools` must be set.", param="tool_choice")
        return ToolMode()
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolMode()
    if choice == "auto":
        if auto_parser is None:
            raise APIError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
                           param="tool_choice")
        return ToolMode(TOOL_PARSERS[auto_parser](tools), finish_reason="tool_calls")
    if choice == "required":
        return ToolMode(RequiredToolParser(tools), _required_schema(tools, parallel_tool_calls), "tool_calls")
    name = choice["function"]["name"]
    functions = {tool["function"]["name"]: tool["function"] for tool in tools}
    if name not in functions:
        raise APIError(f"Tool '{name}' has not been passed in `tools`.", param="tool_choice")
    return ToolMode(NamedToolParser(tools, name), _parameters(functions[name]))


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    # A function without parameters takes an empty object (vLLM generates `{}` for it).
    return copy.deepcopy(function.get("parameters")) or {"type": "object", "properties": {}}


def _required_schema(tools: list[dict[str, Any]], parallel_tool_calls: bool) -> dict[str, Any]:
    """vLLM's `_get_json_schema_from_tool` for `required`: a list of `{"name", "parameters"}`, each item one of the
    tools, their `$defs` gathered at the top (two tools defining one name differently: 400)."""
    defs: dict[str, Any] = {}
    items = []
    for tool in tools:
        function = tool["function"]
        parameters = _parameters(function)
        for def_name, definition in parameters.pop("$defs", {}).items():
            if defs.setdefault(def_name, definition) != definition:
                raise APIError(f"Tool definition '{def_name}' has multiple schemas, which is not supported.",
                               param="tools")
        items.append({
            "properties": {"name": {"type": "string", "enum": [function["name"]]}, "parameters": parameters},
            "required": ["name", "parameters"],
        })
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": items}}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def forced_params(params: SamplingParams, mode: ToolMode) -> SamplingParams:
    """`params` with the structured output a forcing tool choice needs; 400 when the request constrains its output
    itself as well."""
    if mode.schema is None:
        return params
    if params.structured_outputs is not None:
        raise APIError("tool_choice `required` or a named function cannot be combined with structured output",
                       param="tool_choice")
    return dataclasses.replace(params, structured_outputs=StructuredOutputsParams(json=mode.schema))

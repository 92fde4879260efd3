"""Reading tool calls written as JSON objects while they are still being generated: the top-level keys of an
object, each value's span (open-ended while unfinished), without waiting for the object to close."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from json.decoder import scanstring

from loomserve.api.tool_parsers.base import PartialCall

DECODER = json.JSONDecoder()
_WHITESPACE = " \t\n\r"


@dataclass
class ObjectScan:
    """The top-level keys of a JSON object seen so far."""

    values: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # key -> (start, end: None = unfinished)
    end: int | None = None  # just past the closing brace; None while open
    broken: bool = False  # not JSON, whatever follows


def skip_whitespace(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WHITESPACE:
        i += 1
    return i


def scan_object(text: str, start: int) -> ObjectScan:
    """The object that opens at `text[start]` (a "{")."""
    scan = ObjectScan()
    i = skip_whitespace(text, start + 1)
    while i < len(text):
        if text[i] == "}":
            scan.end = i + 1
            return scan
        if text[i] != '"':
            scan.broken = True
            return scan
        try:
            key, i = scanstring(text, i + 1)
        except ValueError:
            return scan  # the key is still being written
        i = skip_whitespace(text, i)
        if i == len(text):
            return scan
        if text[i] != ":":
            scan.broken = True
            return scan
        i = skip_whitespace(text, i + 1)
        if i == len(text):
            return scan
        try:
            _, end = DECODER.raw_decode(text, i)
        except ValueError:
            scan.values[key] = (i, None)  # unfinished (or broken: the final parse finds out)
            return scan
        scan.values[key] = (i, end)
        i = skip_whitespace(text, end)
        if i < len(text) and text[i] == ",":
            i = skip_whitespace(text, i + 1)
        elif i < len(text) and text[i] != "}":
            scan.broken = True
            return scan
    return scan


def json_call(text: str, start: int, argument_keys: tuple[str, ...] = ("arguments", "parameters")) -> \
        tuple[PartialCall, int | None]:
    """The call written as `{"name": ..., "arguments": {...}}` from `text[start]`, and where its object ends (None
    while open). Arguments are the raw JSON text the model wrote, streamed as it grows."""
    scan = scan_object(text, start)
    call = PartialCall()
    name_span = scan.values.get("name")
    if name_span is not None and name_span[1] is not None:
        name = json.loads(text[name_span[0]:name_span[1]])
        call.name = name if isinstance(name, str) else None
    key = next((k for k in argument_keys if k in scan.values), None)
    if call.name is not None and key is not None:
        begin, end = scan.values[key]
        call.arguments = text[begin:end] if end is not None else text[begin:]
    if scan.end is not None and not scan.broken:
        if key is None:
            call.arguments = "{}"
        call.complete = call.name is not None
    if scan.broken:
        call.complete = False
    return call, scan.end


def json_calls(text: str, start: int, separators: str) -> tuple[list[PartialCall], int | None]:
    """Consecutive call objects from `text[start]`, between any of the `separators` characters: the calls, and
    where something that is neither begins (None: the text ended first)."""
    calls: list[PartialCall] = []
    i = start
    while True:
        i = skip_whitespace(text, i)
        while i < len(text) and text[i] in separators:
            i = skip_whitespace(text, i + 1)
        if i == len(text):
            return calls, None
        if text[i] != "{":
            return calls, i
        call, end = json_call(text, i)
        calls.append(call)
        if end is None:
            return calls, None
        i = end

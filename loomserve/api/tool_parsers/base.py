"""What every tool-call parser shares: the parse of a model's text so far (content, then the calls, each possibly
still being written) and the rule that makes streaming a diff of parses.

A parser is a pure function of the text generated so far. Streaming re-parses the growing text and sends what the
new parse adds; that is sound because every parser keeps its parse growing only: content and arguments seen at one
length are prefixes of those seen at any greater length (text that might still become a tool-call marker is held
back until it cannot).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class PartialCall:
    """One tool call as far as the text has written it."""

    name: str | None = None  # None until the whole name has been generated
    arguments: str = ""  # the JSON text of the arguments so far
    complete: bool = False


@dataclass
class ParsedText:
    """The parse of a model's text so far: content the client may see, and the tool calls."""

    content: str
    calls: list[PartialCall] = field(default_factory=list)

    @property
    def valid_calls(self) -> bool:
        """Every call was written out whole (a final parse with a broken call is served as plain content)."""
        return bool(self.calls) and all(c.complete and c.name for c in self.calls)


class ToolParser:
    """Splits generated text into content and tool calls (one subclass per model family's format)."""

    def __init__(self, tools: list[dict[str, Any]]) -> None:
        self.tools = tools  # the request's tools, as OpenAI's JSON shapes

    def parse(self, text: str, final: bool) -> ParsedText:
        """`text` generated so far; `final`: no more will come (nothing is held back)."""
        raise NotImplementedError

    def new_call_id(self) -> str:
        return f"chatcmpl-tool-{uuid.uuid4().hex}"


def held_back(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker` (sent once they cannot)."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-length:]):
            return length
    return 0


def content_before(text: str, marker: str, final: bool) -> tuple[str, int]:
    """(content before the first `marker`, where the marker starts: -1 if absent). Not final: without the marker,
    a tail that may become it is held back."""
    start = text.find(marker)
    if start >= 0:
        return text[:start], start
    return (text if final else text[: len(text) - held_back(text, marker)]), -1

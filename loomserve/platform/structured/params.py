"""What a request asks its output to match, shaped like vLLM's `StructuredOutputsParams` (exactly one kind)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    json: str | dict[str, Any] | None = None  # a JSON schema, as a dict or its JSON text
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # EBNF (GBNF/Lark as the backend reads it)
    json_object: bool | None = None  # any JSON object (OpenAI's response_format json_object)
    structural_tag: str | None = None
    disable_any_whitespace: bool = False
    # The tokens that end a reasoning phase the output opens with (a `--reasoning-parser`'s `</think>`): the grammar
    # applies from after them, as vLLM's does; None: from the first token.
    reasoning_end_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        given = [kind for kind in _KINDS if getattr(self, kind) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs needs exactly one of {', '.join(_KINDS)}; got {given or 'none'}")

    @property
    def kind(self) -> str:
        return next(kind for kind in _KINDS if getattr(self, kind) not in (None, False))

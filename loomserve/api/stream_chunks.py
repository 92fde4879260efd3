"""Stream chunks as SSE bytes without a pydantic model per token.

A stream's envelope (`id`, `object`, `created`, `model`) is encoded once; each chunk encodes only its choices (plain
dicts, whose pydantic parts such as parsed tool calls or logprobs are written as they would serialize) and its
trailing fields, with msgspec. The JSON is the response models' (`protocol.py`): fields in their order, the
envelope's None fields left out, a choice's kept. (Numbers of 1e16 and more would read `1e16` here where pydantic
writes `1e+16`; a chunk carries no such number.)
"""

from __future__ import annotations

from typing import Any

import msgspec
from pydantic import BaseModel

from loomserve.api.protocol import _DropsNone

# Characters that JSON allows raw inside strings but that line-splitting clients (JavaScript, Python's
# str.splitlines) take for line ends, as UTF-8: escaped, as OpenAI's and vLLM's servers do (`streaming.sse`).
_LINE_BREAKS = ((b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"), (b"\xc2\x85", b"\\u0085"))


def _as_json(obj: Any) -> Any:
    """A response model's fields as it serializes them: the models of `protocol.py` declare no aliases or custom
    serializers, only whether they leave None fields out (`_DropsNone`); nested models come back here."""
    if isinstance(obj, _DropsNone):
        return {name: value for name, value in obj.__dict__.items() if value is not None}
    if isinstance(obj, BaseModel):
        return obj.__dict__
    raise TypeError(f"cannot write a {type(obj).__name__} into a stream chunk")


_encoder = msgspec.json.Encoder(enc_hook=_as_json)


def _escape_line_breaks(body: bytes) -> bytes:
    if b"\xe2\x80" not in body and b"\xc2\x85" not in body:  # the common case: one scan each, no copy
        return body
    for raw, escaped in _LINE_BREAKS:
        body = body.replace(raw, escaped)
    return body


class ChunkEnvelope:
    """The fixed fields of one stream's chunks, encoded once; `event` frames a chunk as one SSE event."""

    def __init__(self, id: str, object: str, created: int, model: str) -> None:
        fixed = _encoder.encode({"id": id, "object": object, "created": created, "model": model})
        self._head = b"data: " + fixed[:-1] + b',"choices":'  # the object left open after `model`

    def event(self, choices: list[dict[str, Any]], **tail: Any) -> bytes:
        """`data: {envelope, "choices": [...], tail fields that are not None}` and the blank line; `tail` in the
        response model's field order."""
        body = self._head + _encoder.encode(choices)
        for name, value in tail.items():
            if value is not None:
                body += b',"' + name.encode() + b'":' + _encoder.encode(value)
        return _escape_line_breaks(body + b"}\n\n")

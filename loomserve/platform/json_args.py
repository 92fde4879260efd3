"""Engine arguments that hold a JSON object: a string on the command line, a dict from the Python API."""

from __future__ import annotations

import json


def json_object(value: dict | str | None, name: str, example: str) -> dict:
    """The argument as a dict (empty when not given); a string must parse to a JSON object."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name} is not valid JSON ({exc}); give a JSON object, e.g. '{example}'") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, e.g. '{example}', got {value!r}")
    return dict(value)

"""`--hf-overrides`: vLLM's JSON changes to the checkpoint's config.json as loaded (e.g. `{"is_matryoshka": true}`
or `{"matryoshka_dimensions": [32, 64]}`), applied before anything reads the config; a nested object updates a
sub-config (`{"text_config": {"max_position_embeddings": 512}}`)."""

from __future__ import annotations

from typing import Any

from loomserve.platform.json_args import json_object


def apply_hf_overrides(hf_config: Any, overrides: str | dict | None) -> None:
    """Set each key of `overrides` on `hf_config` (in place)."""
    for key, value in json_object(overrides, "--hf-overrides", '{"is_matryoshka": true}').items():
        _set(hf_config, key, value)


def _set(config: Any, key: str, value: Any) -> None:
    current = getattr(config, key, None)
    if isinstance(value, dict) and current is not None and not isinstance(current, dict):
        for sub_key, sub_value in value.items():  # a sub-config object: update it field by field
            _set(current, sub_key, sub_value)
    else:
        setattr(config, key, value)

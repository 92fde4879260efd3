"""GET /tokenizer_info (`--enable-tokenizer-info-endpoint`): the main model's tokenizer configuration, as its
`tokenizer_config.json` says it (vLLM's route): `tokenizer_class`, the special tokens, `added_tokens_decoder`,
`model_max_length`, ... and the chat template. Server file paths are left out."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from loomserve.api.served_models import Models

router = APIRouter()

_PATH_KEYS = ("vocab_file", "merges_file", "tokenizer_file", "name_or_path")


@router.get("/tokenizer_info")
async def tokenizer_info(models: Models) -> dict[str, Any]:
    tokenizer = models.main.tokenizer
    config = {key: value for key, value in getattr(tokenizer, "init_kwargs", {}).items() if key not in _PATH_KEYS}
    info = {key: _json_value(value) for key, value in config.items()}
    if "added_tokens_decoder" in config:  # id -> the token's fields, where elsewhere a token is its text
        info["added_tokens_decoder"] = {str(i): dict(token.__getstate__())
                                        for i, token in config["added_tokens_decoder"].items()}
    info["tokenizer_class"] = type(tokenizer).__name__
    if getattr(tokenizer, "chat_template", None):
        info["chat_template"] = tokenizer.chat_template
    return info


def _json_value(value: Any) -> Any:
    """`value` as JSON: an AddedToken as its text, other unknown objects as text too."""
    if isinstance(value, dict):
        return {str(key): _json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(getattr(value, "content", value))

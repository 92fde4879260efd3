"""Prompt checks shared by the routes: token ids in the vocabulary, lengths within the model's context, text
tokenized only once its length can fit."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loomserve.api.errors import APIError
from loomserve.api.limits import check_text_fits
from loomserve.modalities.inputs import MultiModalItem
from loomserve.platform.input_processor import first_out_of_vocabulary
from loomserve.platform.skip_tokenizer import NO_TEXT

if TYPE_CHECKING:
    from loomserve.platform.async_llm import AsyncLLM


@dataclass
class Prompt:
    """One prompt as the engine gets it, plus its text where the client sent text."""

    token_ids: list[int]
    text: str | None = None
    mm_items: list[MultiModalItem] = field(default_factory=list)  # media of a multimodal chat, in prompt order


def encode_fitting(engine: AsyncLLM, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
    """`text`'s token ids, unless its length alone shows they cannot fit the model's context (400, untokenized).
    Blocking: call it on the front end's pool."""
    if engine.model_config.skip_tokenizer_init:
        raise APIError(NO_TEXT, param=param)
    check_text_fits(text, engine.tokenizer, engine.model_config.max_model_len, param)
    return engine.tokenizer.encode(text, add_special_tokens=add_special_tokens)


def check_token_ids(token_ids: list[int], vocab_size: int, param: str) -> None:
    """400 for an empty prompt or one with ids outside the vocabulary."""
    if not token_ids:
        raise APIError("The prompt is empty: give at least one token", param=param)
    check_vocab(token_ids, vocab_size, param)


def check_vocab(token_ids: list[int], vocab_size: int, param: str) -> None:
    bad = first_out_of_vocabulary(token_ids, vocab_size)
    if bad is not None:
        raise APIError(f"Token id {bad} is out of the vocabulary [0, {vocab_size})", param=param)


def resolve_max_tokens(prompt_len: int, requested: int | None, max_model_len: int) -> int:
    """The completion budget: the client's `max_tokens`, else whatever the context leaves."""
    if requested is None:
        if prompt_len >= max_model_len:
            raise APIError(
                f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{prompt_len} tokens in the messages, leaving no room for the completion. "
                "Please reduce the length of the messages.",
                param="messages",
            )
        return max_model_len - prompt_len
    if requested >= 1 and prompt_len + requested > max_model_len:
        raise APIError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the messages, {requested} in the completion). "
            "Please reduce the length of the messages or completion.",
            param="max_tokens",
        )
    return requested  # a value below 1 is left for SamplingParams to reject with its own message

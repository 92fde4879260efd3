"""`--skip-tokenizer-init` (vLLM's): the engine runs without a tokenizer. Prompts come as token ids, outputs carry
token ids and no text; whatever needs the tokenizer (text prompts, chat, stop strings, bad words, structured
outputs) is refused saying why.

`NoTokenizer` stands where the tokenizer would: every text it would decode is empty, so the output path runs
unchanged and answers "" for text, and every call that would read text raises `NoTokenizerError`.
"""

from __future__ import annotations

from typing import Any

from loomserve.platform.request import SamplingParams

NO_TEXT = ("this server runs without a tokenizer (--skip-tokenizer-init): send token ids (e.g. `prompt` as a list "
           "of token ids), not text or chat messages")


class NoTokenizerError(ValueError):
    """Text was given, or asked for, where no tokenizer is loaded."""

    def __init__(self, what: str = "") -> None:
        super().__init__(f"{what}: {NO_TEXT}" if what else NO_TEXT)


class NoTokenizer:
    """The tokenizer of an engine that loads none."""

    eos_token_id = bos_token_id = pad_token_id = unk_token_id = None
    all_special_ids: list[int] = []

    def __init__(self) -> None:
        self.chat_template: str | None = None  # a --chat-template may be set here; nothing renders with it

    def decode(self, token_ids: Any, **_: Any) -> str:
        return ""

    def get_vocab(self) -> dict[str, int]:
        return {}

    def encode(self, text: str, **_: Any) -> list[int]:
        raise NoTokenizerError("a text prompt")

    def apply_chat_template(self, *_: Any, **__: Any) -> Any:
        raise NoTokenizerError("chat messages")

    def convert_tokens_to_ids(self, tokens: Any) -> Any:
        raise NoTokenizerError("special tokens by name")


def check_token_only(params: SamplingParams) -> None:
    """NoTokenizerError for sampling fields that read or write text (vLLM refuses them too)."""
    for name, given in (("stop", params.stop), ("bad_words", params.bad_words),
                        ("structured_outputs", params.structured_outputs)):
        if given:
            raise NoTokenizerError(f"`{name}` needs the tokenizer")

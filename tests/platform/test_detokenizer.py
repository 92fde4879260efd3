"""Incremental detokenization and stop strings."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from loomserve.platform.detokenizer import IncrementalDetokenizer, find_stop

TEXT = "café naïve 日本語 🙂 done"


class DecodeOnly:
    """A tokenizer without a Rust backend (as sentencepiece- or tiktoken-based ones are): decode only."""

    def __init__(self, tokenizer) -> None:
        self.inner = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module", params=["rust-stream", "python-window"])
def tokenizer(request, qwen2_checkpoint):
    fast = AutoTokenizer.from_pretrained(qwen2_checkpoint)
    return fast if request.param == "rust-stream" else DecodeOnly(fast)


def test_streamed_text_equals_full_decode_with_multibyte_characters(tokenizer):
    ids = tokenizer.encode(TEXT)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.update([t], finished=i == len(ids) - 1) for i, t in enumerate(ids)]
    assert "".join(pieces) == TEXT
    assert all("\ufffd" not in p for p in pieces)


def test_split_character_is_held_back_until_complete(tokenizer):
    ids = tokenizer.encode("🙂")
    assert len(ids) > 1  # the emoji's bytes span several tokens
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.update([t], False) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.update(ids[-1:], False) == "🙂"


def test_invalid_bytes_are_flushed_at_the_end(tokenizer):
    ids = tokenizer.encode("🙂")[:1]
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.update(ids, finished=True) == tokenizer.decode(ids)


def test_find_stop_cuts_before_the_earliest_stop():
    assert find_stop("hello world. bye", 16, ["bye", "."], include_stop=False) == (".", 11)


def test_find_stop_can_keep_the_stop_string():
    assert find_stop("hello world. bye", 16, ["."], include_stop=True) == (".", 12)


def test_find_stop_sees_a_stop_split_across_deltas():
    assert find_stop("abc<|st", 3, ["<|stop|>"], False) is None
    assert find_stop("abc<|stop|>", 4, ["<|stop|>"], False) == ("<|stop|>", 3)

"""Incremental detokenization and stop strings, on the front end's side of the engine.

Text is emitted only once it is stable: a multi-byte character split across tokens decodes to U+FFFD
until its last byte arrives, so such a tail is held back; at the end whatever remains is flushed.
"""

from __future__ import annotations

from typing import Any

from tokenizers.decoders import DecodeStream

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.num_emitted = 0  # characters handed out so far
        # Fast tokenizers stream in Rust, one call per token; others re-decode a short window.
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens) if self._backend else None
        self.prefix_offset = 0  # decoding starts here, so merges with earlier tokens are seen
        self.read_offset = 0  # text of tokens before this has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def decode_all(self, token_ids: list[int]) -> str:
        """The whole text at once, for a caller that needs no stream."""
        return self._decode(token_ids)

    def update(self, new_token_ids: list[int], finished: bool) -> str:
        """Add tokens; return the newly stable text (everything left, once finished)."""
        self.token_ids.extend(new_token_ids)
        if self._stream is not None and finished:  # all that is left, bytes still waiting for their character too
            delta = self._decode(self.token_ids)[self.num_emitted :]
        elif self._stream is not None and len(new_token_ids) == 1:  # a decode step's one token: no list, no join
            delta = self._stream.step(self._backend, new_token_ids[0]) or ""
        elif self._stream is not None:
            pieces = [self._stream.step(self._backend, t) for t in new_token_ids]
            delta = "".join(p for p in pieces if p is not None)
        else:
            delta = self._window_delta(finished)
        self.num_emitted += len(delta)
        return delta

    def _window_delta(self, finished: bool) -> str:
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset :])
        if len(full_text) <= len(prefix_text) or (full_text.endswith(_REPLACEMENT) and not finished):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return full_text[len(prefix_text) :]


def find_stop(text: str, new_len: int, stops: list[str], include_stop: bool) -> tuple[str, int] | None:
    """The earliest stop string that ends inside the last `new_len` characters of `text`.

    Returns (that stop string, the length of text to keep) or None.
    """
    found: list[tuple[int, str]] = []
    for stop in stops:
        at = text.find(stop, max(0, len(text) - new_len - len(stop) + 1))
        if at >= 0:
            found.append((at, stop))
    if not found:
        return None
    at, stop = min(found)
    return stop, at + len(stop) if include_stop else at

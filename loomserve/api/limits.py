"""The server's limits: what one request may ask (answered 400/413/429 before any heavy work such as tokenizing,
rendering or decoding starts), and how long an engine may stay silent before /health says 503. Their flags and
defaults live here.

Defaults follow OpenAI's published API limits where there is one (2,048 embedding inputs, 20 top logprobs) and
otherwise leave an order of magnitude above what ordinary clients send, so that no single request can hold the
front end for long.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from typing import Any

from loomserve.api.errors import APIError
from loomserve.modalities.budget import MediaBudget


@dataclass(frozen=True)
class ServerLimits:
    max_request_body_bytes: int = 32 << 20  # one HTTP body (JSON), 413 beyond
    max_prompts_per_request: int = 1024  # prompts of one /v1/completions call
    max_inputs_per_request: int = 2048  # inputs of /v1/embeddings and /classify, pairs of /v1/score, /rerank docs
    max_sequences_per_request: int = 1024  # prompts x n of one generation call
    max_stop_strings: int = 32
    max_stop_string_chars: int = 1024
    max_queued_requests: int = 4096  # engine requests waiting beyond the --max-num-seqs running ones; 429 after
    engine_heartbeat_timeout: float = 4.0  # seconds an engine may be silent (no step, no answer to a ping)
    # All media of one request together (each item has its own caps: --max-image-pixels, --limit-mm-per-prompt).
    max_media_bytes_per_request: int = MediaBudget.max_bytes
    max_media_pixels_per_request: int = MediaBudget.max_pixels
    max_audio_seconds_per_request: float = MediaBudget.max_audio_seconds
    max_video_frames_per_request: int = MediaBudget.max_video_frames
    media_request_timeout: float = MediaBudget.deadline_s

    @property
    def media_budget(self) -> MediaBudget:
        return MediaBudget(self.max_media_bytes_per_request, self.max_media_pixels_per_request,
                           self.max_audio_seconds_per_request, self.max_video_frames_per_request,
                           self.media_request_timeout)

    def check_generation(self, prompts: int, n: int, stop: str | list[str] | None) -> None:
        """A generation call's prompt count, sequence count and stop strings."""
        check_count(prompts, self.max_prompts_per_request, "prompts", "prompt", "--max-prompts-per-request")
        self.check_sequences(prompts, n)
        self.check_stop(stop)

    def check_inputs(self, count: int, param: str) -> None:
        check_count(count, self.max_inputs_per_request, "inputs", param, "--max-inputs-per-request")

    def check_sequences(self, prompts: int, n: int) -> None:
        if prompts * n > self.max_sequences_per_request:
            raise APIError(f"This request asks for {prompts} prompt(s) x n={n} = {prompts * n} sequences; this server "
                           f"takes at most {self.max_sequences_per_request} per request "
                           "(--max-sequences-per-request)", param="n")

    def check_stop(self, stop: str | list[str] | None) -> None:
        strings = [stop] if isinstance(stop, str) else stop or []
        check_count(len(strings), self.max_stop_strings, "stop strings", "stop", "--max-stop-strings")
        longest = max(map(len, strings), default=0)
        if longest > self.max_stop_string_chars:
            raise APIError(f"A stop string has {longest} characters; this server takes at most "
                           f"{self.max_stop_string_chars} (--max-stop-string-chars)", param="stop")


_BLANKS = (" ", "\n", "\t", "\r")


def check_count(count: int, limit: int, what: str, param: str, flag: str) -> None:
    if count > limit:
        raise APIError(f"This request has {count} {what}; this server takes at most {limit} per request ({flag})",
                       param=param)


def check_text_fits(text: str, tokenizer: Any, max_model_len: int, param: str) -> None:
    """400 for a text so long that its tokens must overflow the context, decided from its length alone so that a
    huge prompt costs no tokenizing: no token spells more than `max_chars_per_token` characters. Blanks are not
    counted, as some tokenizers (WordPiece) drop them."""
    most = max_model_len * max_chars_per_token(tokenizer)
    if len(text) > most and len(text) - sum(map(text.count, _BLANKS)) > most:
        raise APIError(f"The text has {len(text)} characters, more than the {most} that the {max_model_len} tokens "
                       "of this model's context can spell. Please reduce the length of the input.", param=param)


@functools.cache
def max_chars_per_token(tokenizer: Any) -> int:
    """The longest token of the vocabulary, in characters of its vocabulary entry: an upper bound on the text one
    token covers (byte-level vocabularies spell one byte per character, so a character costs at least one)."""
    return max(map(len, tokenizer.get_vocab()), default=1)


def add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ServerLimits field (`max_stop_strings` -> `--max-stop-strings`)."""
    defaults = ServerLimits()
    for name in ServerLimits.__dataclass_fields__:
        default = getattr(defaults, name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default,
                            help=f"default {default}; see the README's Limits")


def limits_from(ns: argparse.Namespace) -> ServerLimits:
    return ServerLimits(**{name: getattr(ns, name) for name in ServerLimits.__dataclass_fields__})

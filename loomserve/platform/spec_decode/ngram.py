"""The n-gram (prompt lookup) proposer: drafts are the tokens that followed the latest earlier occurrence of the
request's last n tokens, the longest n in [prompt_lookup_min, prompt_lookup_max] that occurs. Free to run (host
numpy over the token list), and strong wherever the output copies its context: rewriting, extraction, code edits."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from loomserve.platform.spec_decode.proposer import LandedStep, Proposer

if TYPE_CHECKING:
    from loomserve.platform.input_batch import RequestState


def lookup(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """Up to k tokens following the latest earlier match of the longest matching suffix of `tokens` [L]."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        windows = sliding_window_view(tokens[: length - 1], n)  # [L - n, n]: every n-gram but the suffix itself
        matches = np.flatnonzero((windows == tokens[length - n :]).all(axis=1))
        if matches.size:
            start = matches[-1] + n
            return tokens[start : start + k].tolist()
    return []


class NgramProposer(Proposer):
    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, states: list[RequestState], caps: list[int], landed: LandedStep) -> list[list[int]]:
        """Each request's drafts, at most caps[i] of them (fewer, or none, where its context has no match)."""
        return [lookup(np.asarray(s.prompt_token_ids + s.output_token_ids), self.min_n, self.max_n, cap)
                for s, cap in zip(states, caps, strict=True)]


class RepeatProposer(Proposer):
    """Benchmarks' synthetic drafts: the last token, `cap` times (their acceptance is drawn, not verified)."""

    def propose(self, states: list[RequestState], caps: list[int], landed: LandedStep) -> list[list[int]]:
        return [[s.output_token_ids[-1]] * cap for s, cap in zip(states, caps, strict=True)]

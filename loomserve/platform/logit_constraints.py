"""Per-request constraints on the logits, as vLLM applies them before penalties: `allowed_token_ids` (every other
token banned), `bad_words` (a word's last token banned where the tokens before it end the output so far) and
OpenAI's `logit_bias` (added to the logits, as transformers' `sequence_bias` does for single tokens)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from loomserve.platform.input_batch import RequestState
    from loomserve.platform.request import SamplingParams


@dataclass
class LogitConstraints:
    """A step's constraints over its B rows; None where no row has one."""

    bias_index: tuple[torch.Tensor, torch.Tensor] | None  # (rows [N], token ids [N]) int64
    bias: torch.Tensor | None  # [N] float32
    disallowed: torch.Tensor | None  # [B, V] bool: tokens outside a row's allowed_token_ids
    banned: tuple[torch.Tensor, torch.Tensor] | None  # (rows [M], token ids [M]) int64: bad words' next tokens


def uses_logit_constraints(p: SamplingParams) -> bool:
    return bool(p.logit_bias or p.allowed_token_ids or p.bad_words_token_ids)


def build_logit_constraints(
    requests: Sequence[RequestState], vocab_size: int, device: torch.device
) -> LogitConstraints | None:
    rows = [(i, r) for i, r in enumerate(requests) if uses_logit_constraints(r.sampling_params)]
    if not rows:
        return None
    bias = [(i, token, value) for i, r in rows for token, value in (r.sampling_params.logit_bias or {}).items()]
    allowed = [(i, r.sampling_params.allowed_token_ids) for i, r in rows if r.sampling_params.allowed_token_ids]
    disallowed = None
    if allowed:
        disallowed = torch.zeros(len(requests), vocab_size, dtype=torch.bool)  # [B, V]
        for i, _ in allowed:
            disallowed[i] = True
        for i, token_ids in allowed:
            disallowed[i, token_ids] = False
        disallowed = disallowed.to(device, non_blocking=True)
    banned = [(i, token) for i, r in rows for token in _bad_word_tokens(r)]
    return LogitConstraints(
        bias_index=_pairs([(i, t) for i, t, _ in bias], device),
        bias=torch.tensor([v for _, _, v in bias], dtype=torch.float32).to(device) if bias else None,
        disallowed=disallowed,
        banned=_pairs(banned, device),
    )


def _bad_word_tokens(request: RequestState) -> list[int]:
    """The tokens that would complete one of the request's bad words after its output so far."""
    output = request.output_token_ids
    banned = []
    for word in request.sampling_params.bad_words_token_ids or []:
        prefix = word[:-1]
        if len(prefix) <= len(output) and (not prefix or output[len(output) - len(prefix):] == prefix):
            banned.append(word[-1])
    return banned


def _pairs(pairs: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not pairs:
        return None
    index = torch.tensor(pairs, dtype=torch.int64).to(device, non_blocking=True)  # [N, 2]
    return index[:, 0], index[:, 1]


def apply_logit_constraints(logits: torch.Tensor, c: LogitConstraints | None) -> torch.Tensor:
    """logits [B, V] with the constraints applied (a new tensor when any applies; the caller's stays raw)."""
    if c is None:
        return logits
    logits = logits.clone()
    if c.disallowed is not None:
        logits.masked_fill_(c.disallowed, -float("inf"))
    if c.banned is not None:
        logits.index_put_(c.banned, torch.tensor(-float("inf"), device=logits.device))
    if c.bias_index is not None:
        logits.index_put_(c.bias_index, c.bias, accumulate=True)
    return logits


def check_logit_constraints(params: SamplingParams, vocab_size: int) -> None:
    """The token ids a client named must be the model's: ValueError naming the first that is not."""
    for name, token_ids in (("logit_bias", params.logit_bias), ("allowed_token_ids", params.allowed_token_ids)):
        bad = next((t for t in token_ids or () if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} in {name} is out of the vocabulary [0, {vocab_size})")


def tokenize_bad_words(tokenizer: Any, bad_words: list[str]) -> list[list[int]]:
    """Each word's token ids as vLLM finds them: the word alone, and with a leading space when that spells it
    with another first token in as many tokens (a word inside the text)."""
    sequences = []
    for word in bad_words:
        alone = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        if not alone:
            raise ValueError(f"bad_words: {word!r} has no tokens")
        sequences.append(alone)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if spaced and spaced[0] != alone[0] and len(spaced) == len(alone):
            sequences.append(spaced)
    return sequences

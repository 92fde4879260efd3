"""Engine logprobs (`{token_id: Logprob}` per generated token) in OpenAI's completions and chat shapes."""

from __future__ import annotations

import math

from loomserve.api.protocol import ChatLogProb, ChatLogProbs, ChatLogProbsContent, CompletionLogProbs
from loomserve.platform.request import Logprob

_FLOOR = -9999.0  # JSON has no -inf; OpenAI clients expect a number


def completion_logprobs(
    token_ids: list[int], steps: list[dict[int, Logprob]], text_offset: int
) -> CompletionLogProbs:
    """Legacy completions shape; `text_offset` is where the first token starts in the choice's text."""
    result = CompletionLogProbs()
    for token_id, step in zip(token_ids, steps, strict=True):
        token = _text(step[token_id])
        result.tokens.append(token)
        result.token_logprobs.append(_number(step[token_id].logprob))
        result.top_logprobs.append(_top_by_text(step))
        result.text_offset.append(text_offset)
        text_offset += len(token)
    return result


def chat_logprobs(token_ids: list[int], steps: list[dict[int, Logprob]], num_top: int) -> ChatLogProbs:
    """Chat shape: each token with its bytes and the `num_top` most likely alternatives."""
    content = [
        ChatLogProbsContent(
            **_chat_entry(step[token_id]).model_dump(),
            top_logprobs=[_chat_entry(lp) for lp in _by_rank(step)[:num_top]],
        )
        for token_id, step in zip(token_ids, steps, strict=True)
    ]
    return ChatLogProbs(content=content)


def _top_by_text(step: dict[int, Logprob]) -> dict[str, float]:
    """Text -> logprob, most likely first; of tokens that decode alike, the most likely one speaks."""
    top: dict[str, float] = {}
    for lp in _by_rank(step):
        top.setdefault(_text(lp), _number(lp.logprob))
    return top


def _chat_entry(lp: Logprob) -> ChatLogProb:
    token = _text(lp)
    return ChatLogProb(token=token, logprob=_number(lp.logprob), bytes=list(token.encode("utf-8")))


def _by_rank(step: dict[int, Logprob]) -> list[Logprob]:
    return sorted(step.values(), key=lambda lp: lp.rank if lp.rank is not None else math.inf)


def _text(lp: Logprob) -> str:
    return lp.decoded_token or ""


def _number(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _FLOOR

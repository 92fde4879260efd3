"""Engine logprobs (`{token_id: Logprob}` per token) in OpenAI's completions and chat shapes and vLLM's
`prompt_logprobs` shape, and the check of what a request asks against --max-logprobs.

`as_ids` is vLLM's `return_tokens_as_token_ids`: every token is named `token_id:<id>` instead of its text, so tokens
that are not valid UTF-8 on their own stay distinguishable.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from loomserve.api.errors import APIError
from loomserve.api.protocol import (
    ChatLogProb,
    ChatLogProbs,
    ChatLogProbsContent,
    CompletionLogProbs,
    PromptLogprob,
    SamplingRequest,
)
from loomserve.platform.config import ModelConfig
from loomserve.platform.request import Logprob, PromptLogprobs, resolve_num_logprobs

_FLOOR = -9999.0  # JSON has no -inf; OpenAI clients expect a number (vLLM's clamp)

# The request fields that count logprobs (chat's boolean `logprobs` only switches `top_logprobs` on).
_COUNTED_FIELDS = ("logprobs", "top_logprobs", "prompt_logprobs")


def check_max_logprobs(request: SamplingRequest, model_config: ModelConfig) -> None:
    """400 naming the field that asks for more logprobs (-1: the vocabulary) than --max-logprobs allows."""
    vocab_size = model_config.vocab_size
    cap = resolve_num_logprobs(model_config.max_logprobs, vocab_size)
    for name in _COUNTED_FIELDS:
        asked = getattr(request, name, None)
        if asked is None or isinstance(asked, bool):
            continue
        if resolve_num_logprobs(asked, vocab_size) > cap:
            raise APIError(f"`{name}` asks for {resolve_num_logprobs(asked, vocab_size)} logprobs; this server gives "
                           f"at most {cap} (--max-logprobs)", param=name)


def completion_logprobs(
    token_ids: list[int],
    steps: list[dict[int, Logprob] | None],
    text_offset: int,
    decode: Callable[[int], str],
    as_ids: bool = False,
) -> CompletionLogProbs:
    """Legacy completions shape; `text_offset` is where the first token starts in the choice's text. A None step (the
    first token of an echoed prompt) has no logprob: its token is decoded on its own."""
    result = CompletionLogProbs()
    for token_id, step in zip(token_ids, steps, strict=True):
        token = _name(token_id, step[token_id] if step is not None else None, as_ids, decode)
        result.tokens.append(token)
        result.token_logprobs.append(_number(step[token_id].logprob) if step is not None else None)
        result.top_logprobs.append(_top_by_name(step, as_ids) if step is not None else None)
        result.text_offset.append(text_offset)
        text_offset += len(token)
    return result


def joined_logprobs(first: CompletionLogProbs, then: CompletionLogProbs) -> CompletionLogProbs:
    """One choice's logprobs from two runs of tokens (an echoed prompt's, then the completion's)."""
    return CompletionLogProbs(
        text_offset=first.text_offset + then.text_offset, token_logprobs=first.token_logprobs + then.token_logprobs,
        tokens=first.tokens + then.tokens, top_logprobs=first.top_logprobs + then.top_logprobs,
    )


def chat_logprobs(token_ids: list[int], steps: list[dict[int, Logprob]], num_top: int,
                  as_ids: bool = False) -> ChatLogProbs:
    """Chat shape: each token with its bytes and the `num_top` most likely alternatives (-1: all there are)."""
    content = []
    for token_id, step in zip(token_ids, steps, strict=True):
        chosen = _chat_entry(token_id, step[token_id], as_ids)
        top = [_chat_entry(i, lp, as_ids) for i, lp in _by_rank(step)[: None if num_top < 0 else num_top]]
        content.append(ChatLogProbsContent(token=chosen.token, logprob=chosen.logprob, bytes=chosen.bytes,
                                           top_logprobs=top))
    return ChatLogProbs(content=content)


def prompt_logprobs_json(prompt_logprobs: PromptLogprobs | None) -> list[dict[int, PromptLogprob] | None] | None:
    """vLLM's `prompt_logprobs` field: per prompt token, token id -> {logprob, rank, decoded_token}; the first None."""
    if prompt_logprobs is None:
        return None
    return [
        None if step is None else {
            token_id: PromptLogprob(logprob=_number(lp.logprob), rank=lp.rank, decoded_token=lp.decoded_token)
            for token_id, lp in step.items()
        }
        for step in prompt_logprobs
    ]


def _top_by_name(step: dict[int, Logprob], as_ids: bool) -> dict[str, float]:
    """Token -> logprob, most likely first; of tokens that decode alike, the most likely one speaks."""
    top: dict[str, float] = {}
    for token_id, lp in _by_rank(step):
        top.setdefault(_name(token_id, lp, as_ids), _number(lp.logprob))
    return top


def _chat_entry(token_id: int, lp: Logprob, as_ids: bool) -> ChatLogProb:
    token = _name(token_id, lp, as_ids)
    return ChatLogProb(token=token, logprob=_number(lp.logprob), bytes=list(token.encode("utf-8")))


def _by_rank(step: dict[int, Logprob]) -> list[tuple[int, Logprob]]:
    return sorted(step.items(), key=lambda item: item[1].rank if item[1].rank is not None else math.inf)


def _name(token_id: int, lp: Logprob | None, as_ids: bool, decode: Callable[[int], str] | None = None) -> str:
    if as_ids:
        return f"token_id:{token_id}"
    if lp is None:
        return decode(token_id) if decode is not None else ""
    return lp.decoded_token or ""


def _number(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _FLOOR

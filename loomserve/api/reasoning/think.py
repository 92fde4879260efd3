"""`<think>...</think>` reasoning: the text inside is `reasoning_content`, what follows the closing tag is content.

Like the tool parsers, a parser is a pure function of the text so far whose parts only grow, so streaming sends
the difference between parses (a tail that may become a tag is held back until it cannot).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loomserve.api.tool_parsers.base import held_back

START, END = "<think>", "</think>"


@dataclass
class ReasoningSplit:
    reasoning: str | None  # None: the model did not reason (as far as the text shows)
    content: str
    ended: bool  # reasoning is over: what follows is the answer (tool calls are parsed from here on)


class ReasoningParser:
    """DeepSeek-R1's rule: everything up to `</think>` is reasoning (the template may open `<think>` in the
    prompt, so the opening tag is optional); without `</think>` the whole text is reasoning."""

    def end_token_ids(self, tokenizer: Any, prompt_token_ids: list[int]) -> list[int] | None:
        """The tokens that will end the reasoning the output starts in, or None when the prompt closed it already
        (its last `</think>` comes after its last `<think>`, as with Qwen3's `enable_thinking: false`): structured
        output applies after them, as vLLM's reasoning parsers' `is_reasoning_end` decides."""
        end = tokenizer.encode(END, add_special_tokens=False)
        start = tokenizer.encode(START, add_special_tokens=False)
        closed = _last_at(prompt_token_ids, end) > _last_at(prompt_token_ids, start)
        return None if closed else end

    def split(self, text: str, final: bool) -> ReasoningSplit:
        stripped = text.lstrip()
        if stripped.startswith(START):
            text = stripped[len(START):]
        elif not final and START.startswith(stripped):
            return ReasoningSplit(None, "", False)  # may still open with <think>
        return self._after_start(text, final)

    def _after_start(self, text: str, final: bool) -> ReasoningSplit:
        reasoning, sep, content = text.partition(END)
        if sep:
            return ReasoningSplit(reasoning, content, True)
        return ReasoningSplit(text if final else text[: len(text) - held_back(text, END)], "", False)


class DeepSeekR1ReasoningParser(ReasoningParser):
    pass


class Qwen3ReasoningParser(ReasoningParser):
    """Qwen3's rule: the model opens its reasoning with `<think>` itself; an answer that does not (as with
    `enable_thinking: false`, whose template closes an empty think block in the prompt) is all content."""

    def split(self, text: str, final: bool) -> ReasoningSplit:
        stripped = text.lstrip()
        if stripped.startswith(START):
            return self._after_start(stripped[len(START):], final)
        if not final and START.startswith(stripped):
            return ReasoningSplit(None, "", False)
        return ReasoningSplit(None, text, True)


def _last_at(tokens: list[int], sequence: list[int]) -> int:
    """Where `sequence` last starts in `tokens`; -1 if nowhere."""
    n = len(sequence)
    return next((i for i in range(len(tokens) - n, -1, -1) if tokens[i:i + n] == sequence), -1)

"""Compiling a `GrammarSpec` against the model's tokenizer into a matcher: the grammar state of one request.

Both backends keep the bitmask format of xgrammar (int32 words, bit i of word w allows token 32 * w + i) over the
model's logits width, which may exceed the tokenizer's vocabulary: ids past it are never allowed. A matcher's stop
tokens are its request's (eos plus stop_token_ids), so a grammar that is complete allows exactly those.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Protocol

import torch

from loomserve.platform.structured.grammar import XGRAMMAR, GrammarSpec, guidance_grammar, structural_tag_args

# Whitespace between JSON tokens comes in runs of at most this many characters: enough for any indentation a model
# writes, and a model gone astray (or random weights) cannot fill max_tokens with whitespace.
MAX_WHITESPACE_RUN = 32


class Matcher(Protocol):
    def accept(self, token: int) -> bool:
        """Advance past `token`; False (and no change) when the grammar does not allow it."""

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into row `row` of `bitmask` [R, W] int32 (on the host)."""

    def rollback(self, num_tokens: int) -> None: ...

    def is_terminated(self) -> bool: ...


class _XgrammarMatcher:
    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def accept(self, token: int) -> bool:
        return self.matcher.accept_token(token)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def rollback(self, num_tokens: int) -> None:
        self.matcher.rollback(num_tokens)

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()


class _GuidanceMatcher:
    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def accept(self, token: int) -> bool:
        return self.matcher.try_consume_tokens([token]) == 1

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self.matcher, bitmask, row)

    def rollback(self, num_tokens: int) -> None:
        self.matcher.rollback(num_tokens)

    def is_terminated(self) -> bool:
        return self.matcher.is_stopped()


class GrammarCompiler:
    """Compiles specs for one model (thread-safe: the engine's compile threads share it). The tokenizer tables
    are built on first use, in a compile thread, so an engine that never sees a grammar never pays for them."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the logits width

    @cached_property
    def _xgrammar(self) -> Any:
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size)
        return xgr.GrammarCompiler(info, max_threads=1)  # one per compile thread: the pool sets the parallelism

    @cached_property
    def _guidance_tokenizer(self) -> Any:
        import llguidance.hf

        return llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size)

    def compile(self, spec: GrammarSpec, stop_token_ids: list[int]) -> Matcher:
        if spec.backend == XGRAMMAR:
            import xgrammar as xgr

            compiled = self._compile_xgrammar(spec)
            return _XgrammarMatcher(xgr.GrammarMatcher(compiled, override_stop_tokens=stop_token_ids or None))
        import llguidance

        matcher = llguidance.LLMatcher(self._guidance_tokenizer, guidance_grammar(spec))
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return _GuidanceMatcher(matcher)

    def _compile_xgrammar(self, spec: GrammarSpec) -> Any:
        compiler = self._xgrammar
        whitespace = {"any_whitespace": spec.any_whitespace, "max_whitespace_cnt": MAX_WHITESPACE_RUN}
        if spec.kind == "json":
            return compiler.compile_json_schema(spec.source, **whitespace)
        if spec.kind == "json_object":  # any object: properties the schema does not name are allowed
            return compiler.compile_json_schema('{"type": "object"}', strict_mode=False, **whitespace)
        if spec.kind == "regex":
            return compiler.compile_regex(spec.source)
        if spec.kind == "grammar":
            return compiler.compile_grammar(spec.source)
        return compiler.compile_structural_tag(*structural_tag_args(spec.source))


class BitmaskFiller:
    """Fills many matchers' rows of one bitmask: xgrammar's together, on its own threads (the step waits for this,
    so a batch of 64 must not cost 64 fills in a row); llguidance's one by one."""

    def __init__(self) -> None:
        self._batch: Any = None  # xgrammar's BatchGrammarMatcher, made on first use

    def fill(self, jobs: list[tuple[Matcher, int]], bitmask: torch.Tensor) -> None:
        """Row `row` of `bitmask` gets what `matcher` allows next, for each (matcher, row)."""
        together = [(m.matcher, row) for m, row in jobs if isinstance(m, _XgrammarMatcher)]
        if len(together) > 1:
            if self._batch is None:
                import xgrammar as xgr

                self._batch = xgr.BatchGrammarMatcher()
            matchers, rows = zip(*together, strict=True)
            self._batch.batch_fill_next_token_bitmask(list(matchers), bitmask, list(rows))
        for matcher, row in jobs:
            if len(together) <= 1 or not isinstance(matcher, _XgrammarMatcher):
                matcher.fill(bitmask, row)


def bitmask_width(vocab_size: int) -> int:
    """int32 words per bitmask row for `vocab_size` logits."""
    return (vocab_size + 31) // 32

"""Where a generation answer reports token usage, as vLLM decides it: `stream_options.include_usage` (a last chunk
with the totals), `continuous_usage_stats` (usage in every chunk), `--enable-force-include-usage` (the last chunk
always) and `--enable-prompt-tokens-details` (cached prompt tokens shown)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from loomserve.api.protocol import SamplingRequest, UsageInfo
from loomserve.api.server_features import ServerFeatures
from loomserve.platform.request import CompletionOutput, RequestOutput


@dataclass(frozen=True)
class UsageReport:
    final_chunk: bool = False  # a stream ends with a chunk of no choices and the totals
    every_chunk: bool = False  # each stream chunk carries its choice's usage so far
    prompt_details: bool = False

    @classmethod
    def of(cls, request: SamplingRequest, raw_request: Request) -> UsageReport:
        features: ServerFeatures = raw_request.app.state.features
        options = request.stream_options
        final = features.force_include_usage or (options is not None and bool(options.include_usage))
        every = final and options is not None and bool(options.continuous_usage_stats)
        return cls(final, every, features.prompt_tokens_details)

    def total(self, outputs: list[RequestOutput]) -> UsageInfo:
        """Token counts over the final outputs of all prompts: each prompt once, every completion."""
        cached = sum(out.num_cached_tokens for out in outputs) if self.prompt_details else None
        return UsageInfo.of(
            prompt_tokens=sum(len(out.prompt_token_ids) for out in outputs),
            completion_tokens=sum(len(c.token_ids) for out in outputs for c in out.outputs),
            cached_tokens=cached,
        )

    def so_far(self, output: RequestOutput, choice: CompletionOutput) -> UsageInfo | None:
        """A chunk's usage under `continuous_usage_stats`: the prompt and the choice's tokens so far."""
        if not self.every_chunk:
            return None
        return UsageInfo.of(len(output.prompt_token_ids), len(choice.token_ids), cached_tokens=None)

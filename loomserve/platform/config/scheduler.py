"""SchedulerConfig: the token budget and request count of one step."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    enable_chunked_prefill: bool = True  # off for encoder-only models: their prompts must run whole
    num_lookahead_tokens: int = 0  # KV slots booked past a step's tokens (a draft model's drafts)

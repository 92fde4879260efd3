"""Numbers the engine reports each step, for logs and Prometheus."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecDecodingStats:
    """Speculative decoding's verifications since the last report, counted as vLLM's `spec_decode_*` metrics."""

    num_drafts: int = 0  # verifications of one request's drafts
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)  # [k]: accepted at draft position i

    def observe(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        if len(self.num_accepted_tokens_per_pos) < num_draft_tokens:
            self.num_accepted_tokens_per_pos += [0] * (num_draft_tokens - len(self.num_accepted_tokens_per_pos))
        for i in range(num_accepted):
            self.num_accepted_tokens_per_pos[i] += 1


@dataclass
class SchedulerStats:
    """Engine-side gauges and counters, sent with every batch of outputs."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache this step
    prefix_cache_hits: int = 0  # of those, tokens found
    num_preemptions: int = 0  # preemptions this step
    num_iteration_tokens: int = 0  # prompts done plus tokens generated this step (vLLM's iteration_tokens_total)
    spec_decoding: SpecDecodingStats | None = None  # None: no drafts verified this step
    first_scheduled: dict[str, float] = field(default_factory=dict)  # engine request id -> wall time first scheduled
    running_lora_adapters: dict[str, int] = field(default_factory=dict)  # adapter name -> running requests
    waiting_lora_adapters: dict[str, int] = field(default_factory=dict)


@dataclass
class FinishedRequestStats:
    """One finished request's numbers, as vLLM's per-request histograms take them (seconds; a phase the request
    never reached counts 0)."""

    finish_reason: str
    e2e_latency: float
    num_prompt_tokens: int
    num_generation_tokens: int  # over all its `n` completions
    max_num_generation_tokens: int  # of its longest completion
    n: int = 1
    max_tokens: int | None = None
    queued_time: float = 0.0  # arrival -> first scheduled
    prefill_time: float = 0.0  # first scheduled -> first token
    decode_time: float = 0.0  # first token -> last token
    inference_time: float = 0.0  # first scheduled -> last token
    mean_time_per_output_token: float | None = None  # decode_time / (tokens - 1); None with a single token

    @classmethod
    def timed(cls, finish_reason: str, arrival: float, scheduled: float | None, first_token: float | None,
              last_token: float | None, now: float, **counts: int | None) -> FinishedRequestStats:
        """The phases from the request's timestamps (wall clock; None: never reached)."""
        scheduled = scheduled if scheduled is not None else (first_token or now)
        first_token = first_token if first_token is not None else now
        last_token = last_token if last_token is not None else first_token
        stats = cls(finish_reason, now - arrival, **counts)
        stats.queued_time = max(0.0, scheduled - arrival)
        stats.prefill_time = max(0.0, first_token - scheduled)
        stats.decode_time = max(0.0, last_token - first_token)
        stats.inference_time = max(0.0, last_token - scheduled)
        if stats.max_num_generation_tokens > 1:
            stats.mean_time_per_output_token = stats.decode_time / (stats.max_num_generation_tokens - 1)
        return stats


@dataclass
class IterationStats:
    """Front-end measurements over one batch of engine outputs (seconds)."""

    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    e2e_latencies: list[float] = field(default_factory=list)
    finished_reasons: list[str] = field(default_factory=list)
    finished_requests: list[FinishedRequestStats] = field(default_factory=list)

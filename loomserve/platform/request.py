"""The things that flow through the engine: sampling parameters, requests, their outputs."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from loomserve.adapters.request import LoRARequest
from loomserve.platform.structured.params import StructuredOutputsParams
from loomserve.pooling.params import PoolingParams

if TYPE_CHECKING:
    from loomserve.modalities.inputs import MultiModalItem

_SAMPLING_EPS = 1e-5


@dataclass
class SamplingParams:
    """Per-request sampling settings, shaped like vLLM's `SamplingParams`."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per sampled token; 0 = only the sampled one; -1: all
    prompt_logprobs: int | None = None  # the same for each prompt token (the first has none); -1: the vocabulary
    best_of: int | None = None  # candidates to sample; the n with the highest cumulative logprob are returned
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100] (OpenAI)
    allowed_token_ids: list[int] | None = None  # only these may be sampled
    bad_words: list[str] | None = None  # never generated (their last token is banned after the rest)
    bad_words_token_ids: list[list[int]] | None = None  # bad_words as the front end tokenized them

    def __post_init__(self) -> None:
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.logit_bias is not None:  # JSON object keys arrive as strings
            self.logit_bias = {int(token): float(bias) for token, bias in self.logit_bias.items()}
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k is None or self.top_k < 0:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field out of range."""
        checks = [
            (self.n >= 1, "n", "must be at least 1"),
            (self.temperature >= 0.0, "temperature", "must be non-negative"),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be -1 (off) or positive"),
            (0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]"),
            (self.repetition_penalty > 0.0, "repetition_penalty", "must be positive"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be at least 1"),
            (self.min_tokens >= 0, "min_tokens", "must be non-negative"),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                "min_tokens",
                "must not exceed max_tokens",
            ),
            (self.logprobs is None or self.logprobs >= -1, "logprobs", "must be -1 (all) or non-negative"),
            (self.prompt_logprobs is None or self.prompt_logprobs >= -1, "prompt_logprobs",
             "must be -1 (all) or non-negative"),
            (self.best_of is None or self.best_of >= self.n, "best_of", "must be at least n"),
            (all(s for s in self.stop), "stop", "must not contain empty strings"),
            (all(-100 <= b <= 100 for b in (self.logit_bias or {}).values()), "logit_bias",
             "values must be in [-100, 100]"),
            (self.allowed_token_ids is None or len(self.allowed_token_ids) > 0, "allowed_token_ids",
             "must not be empty"),
            (all(w.strip() for w in self.bad_words or []), "bad_words", "must not contain blank words"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < _SAMPLING_EPS

    @property
    def num_candidates(self) -> int:
        """How many sequences run: best_of when given, else n."""
        return self.best_of or self.n

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        return cls(**d)


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class TokenCounts:
    """Counts over `prompt_token_ids` and `output_token_ids`, for the scheduler's and the runner's request state."""

    prompt_token_ids: list[int]
    output_token_ids: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)


@dataclass(eq=False)
class Request(TokenCounts):
    """The scheduler's state of one sequence (a child of an `n > 1` request is its own Request)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams | None  # None for a pooling request
    eos_token_id: int | None = None
    arrival_time: float = 0.0
    cache_salt: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_pending_tokens: int = 0  # sampled on the device, not yet appended (async scheduling keeps one in flight)
    spec_token_ids: list[int] = field(default_factory=list)  # drafts proposed for the next step, not yet verified
    num_cached_tokens: int = -1  # prompt tokens served from the prefix cache at first schedule
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    lora_request: LoRARequest | None = None
    mm_items: list[MultiModalItem] = field(default_factory=list)  # media, in prompt order
    pooling_params: PoolingParams | None = None  # set for embedding / scoring requests: prefill only, then done
    kv_transfer_params: dict[str, Any] | None = None  # in: the KV connector's orders; out once finished: its answer
    # What the runner has been told: whether it knows the request, and how many of its blocks it holds.
    known_to_runner: bool = False
    num_blocks_sent: int = 0

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def needs_history(self) -> bool:
        """Whether sampling reads the generated tokens themselves (penalties, min_tokens), not just their count."""
        p = self.sampling_params
        return p is not None and (p.repetition_penalty != 1.0 or p.presence_penalty != 0.0
                                  or p.frequency_penalty != 0.0 or p.min_tokens > 0 or bool(p.bad_words_token_ids))

    @property
    def needed_features(self) -> list[str]:
        """The features (by their hooks' names) without which the engine cannot run this request."""
        media = not all(item.is_prompt_embeds for item in self.mm_items)  # prompt_embeds are checked up front
        return [name for name, needed in (("lora", self.lora_request), ("mm", media)) if needed]

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Asks for the logprobs of its prompt: every prompt position must run, none may come from the prefix cache."""
        return self.sampling_params is not None and self.sampling_params.prompt_logprobs is not None

    @property
    def needs_whole_prompt(self) -> bool:
        """Pools over more than its last token: the prompt runs in one step and skips the prefix cache."""
        return self.pooling_params is not None and self.pooling_params.needs_whole_prompt


@dataclass
class Logprob:
    """One token's log-probability, its rank in the distribution, and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per generated token: token id -> Logprob (the sampled token plus the top-k).
SampleLogprobs = list[dict[int, Logprob]]
# One entry per prompt token, the same dicts; the first token has nothing before it to be predicted from: None.
PromptLogprobs = list[dict[int, Logprob] | None]


def resolve_num_logprobs(k: int | None, vocab_size: int) -> int | None:
    """A request's count of top logprobs in tokens: -1 means the whole vocabulary."""
    return vocab_size if k == -1 else k


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """What the front end hands back for a request: prompt plus `n` completions so far."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    kv_transfer_params: dict[str, Any] | None = None  # a prefill instance's answer: where its KV waits
    prompt_logprobs: PromptLogprobs | None = None  # when the request asked for them

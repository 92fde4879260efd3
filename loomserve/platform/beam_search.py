"""Beam search on top of the engine as vLLM v1 does it: not in the sampler, but from the front end, a token at a time.

Each step runs every live beam as a request of max_tokens=1 asking for 2 * beam_width logprobs (the prefix cache holds
the beams' shared prefixes, so a step costs about one decode per beam); each beam's candidates extend it, a candidate
ending in end-of-sequence completes, and the beam_width best of the rest run on. At the end the beam_width best of the
completed and the running beams are returned, ranked by `cum_logprob / len(tokens) ** length_penalty` (vLLM's
`get_beam_search_score`: prompt tokens count, a final end-of-sequence token does not).
`LLM.beam_search` drives it synchronously, the HTTP routes through AsyncLLM (`api/beam_search.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loomserve.platform.request import Logprob, SampleLogprobs, SamplingParams


@dataclass
class BeamSearchParams:
    """vLLM's `BeamSearchParams`, plus `early_stopping` (HF's True: stop once beam_width beams have completed;
    False, vLLM v1's only behaviour: run until max_tokens or until no beam is left running)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    early_stopping: bool = False
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if self.beam_width < 1:
            raise ValueError(f"beam_width must be at least 1, got {self.beam_width}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")

    def step_params(self) -> SamplingParams:
        """What each beam's one-token request asks of the engine."""
        return SamplingParams(logprobs=2 * self.beam_width, max_tokens=1, temperature=self.temperature,
                              ignore_eos=True)


@dataclass
class BeamSearchSequence:
    """A beam: the prompt and its generated tokens, one logprob dict per generated token."""

    tokens: list[int]
    logprobs: SampleLogprobs = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None  # "stop" (ended in end-of-sequence) or "length"
    stop_reason: int | str | None = None


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first


def beam_score(tokens: list[int], cum_logprob: float, eos_token_id: int | None, length_penalty: float) -> float:
    """vLLM's `get_beam_search_score`: the cumulative logprob over the length (without a final eos) to the penalty."""
    length = len(tokens) - (tokens[-1] == eos_token_id)
    return cum_logprob / (length**length_penalty)


class BeamSearch:
    """One prompt's search: its running beams and those completed."""

    def __init__(self, prompt_token_ids: list[int], params: BeamSearchParams, eos_token_id: int | None,
                 max_model_len: int) -> None:
        self.params = params
        self.eos_token_id = eos_token_id
        self.max_model_len = max_model_len
        self.num_prompt_tokens = len(prompt_token_ids)
        self.running = [BeamSearchSequence(list(prompt_token_ids))]
        self.completed: list[BeamSearchSequence] = []

    @property
    def done(self) -> bool:
        p = self.params
        return not self.running or (p.early_stopping and len(self.completed) >= p.beam_width)

    def _score(self, beam: BeamSearchSequence) -> float:
        return beam_score(beam.tokens, beam.cum_logprob, self.eos_token_id, self.params.length_penalty)

    def advance(self, step_logprobs: list[dict[int, Logprob]]) -> None:
        """Extend each running beam (in order) by its candidates: the token logprobs of its one-token request."""
        candidates = []
        for beam, logprobs in zip(self.running, step_logprobs, strict=True):
            for token_id, lp in logprobs.items():
                new = BeamSearchSequence(beam.tokens + [token_id], beam.logprobs + [logprobs],
                                         beam.cum_logprob + lp.logprob)
                if token_id == self.eos_token_id and not self.params.ignore_eos:
                    new.finish_reason = "stop"
                    self.completed.append(new)
                else:
                    candidates.append(new)
        self.running = sorted(candidates, key=self._score, reverse=True)[: self.params.beam_width]
        num_tokens = len(self.running[0].tokens) if self.running else 0  # all running beams have one length
        if num_tokens - self.num_prompt_tokens >= self.params.max_tokens or num_tokens >= self.max_model_len:
            for beam in self.running:
                beam.finish_reason = "length"
            self.completed += self.running
            self.running = []

    def output(self, tokenizer: Any) -> BeamSearchOutput:
        """The best beams, each with its text: the prompt and the generated tokens decoded, as vLLM's LLM gives."""
        best = self.best()
        for beam in best:
            beam.text = tokenizer.decode(beam.tokens, skip_special_tokens=True)
        return BeamSearchOutput(best)

    def best(self) -> list[BeamSearchSequence]:
        """The beam_width best beams, best first: of the completed ones once early stopping ended the search, else
        of the completed and the running ones."""
        width = self.params.beam_width
        stopped_early = self.params.early_stopping and len(self.completed) >= width
        pool = self.completed if stopped_early else self.completed + self.running
        return sorted(pool, key=self._score, reverse=True)[:width]


@dataclass
class BeamSearchBatch:
    """Several prompts' searches stepped together: one batch of one-token requests per step."""

    searches: list[BeamSearch]

    @property
    def done(self) -> bool:
        return all(s.done for s in self.searches)

    def prompts(self) -> list[list[int]]:
        """The token ids of every running beam of the searches not done, in order: this step's requests."""
        return [beam.tokens for s in self.searches if not s.done for beam in s.running]

    def advance(self, step_logprobs: list[dict[int, Logprob]]) -> None:
        """Take the step's logprob dicts, one per prompt of `prompts()`, in the same order."""
        at = 0
        for search in [s for s in self.searches if not s.done]:
            n = len(search.running)
            search.advance(step_logprobs[at : at + n])
            at += n

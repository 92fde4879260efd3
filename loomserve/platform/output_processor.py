"""Engine outputs in, RequestOutputs out: detokenize, apply stop strings, gather `n` children, time it all.

An `n > 1` request runs in the engine as n child requests that share the prompt (and so its cached
KV blocks); this is where they are gathered back into one RequestOutput.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from loomserve.platform.detokenizer import IncrementalDetokenizer, find_stop
from loomserve.platform.messages import EngineCoreOutput, TokenLogprobs
from loomserve.platform.request import (
    CompletionOutput,
    Logprob,
    PromptLogprobs,
    RequestOutput,
    SampleLogprobs,
    SamplingParams,
)
from loomserve.platform.stats import FinishedRequestStats, IterationStats


def child_request_ids(request_id: str, n: int) -> list[str]:
    return [request_id] if n == 1 else [f"{i}_{request_id}" for i in range(n)]


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    """Each child samples on its own; a seeded request gives child i the seed + i, as vLLM does. With best_of > n
    every child reports its tokens' logprobs, which rank it."""
    d = params.to_dict()
    d["n"], d["best_of"] = 1, None
    if params.seed is not None:
        d["seed"] = params.seed + index
    if params.num_candidates > params.n and params.logprobs is None:
        d["logprobs"] = 0
    return SamplingParams.from_dict(d)


@dataclass
class ChildState:
    index: int
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: SampleLogprobs | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    last_token_time: float = 0.0
    shows_logprobs: bool = True  # False: collected only to rank best_of candidates

    def visible_text(self) -> str:
        """Hold back a tail that could still grow into a stop string, until the child finishes."""
        hold = max((len(s) for s in self.params.stop), default=1) - 1
        if self.finish_reason is not None or hold == 0:
            return self.text
        return self.text[: max(0, len(self.text) - hold)]

    def to_output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.visible_text(),
            token_ids=list(self.token_ids),
            cumulative_logprob=self.cumulative_logprob,
            logprobs=self.logprobs if self.shows_logprobs else None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


@dataclass
class ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[ChildState]
    arrival_time: float
    first_token_time: float | None = None
    scheduled_time: float | None = None  # when the engine first scheduled one of its children
    num_cached_tokens: int = 0
    kv_transfer_params: dict[str, Any] | None = None  # a prefill instance's answer (n == 1)
    queue: Any = None  # the async front end's per-request OutputCollector
    num_returned: int = 1  # n: fewer than the children when best_of > n
    prompt_logprobs: PromptLogprobs | None = None

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.children)

    @property
    def selects_best(self) -> bool:
        """best_of > n: only the finished request says which candidates are returned."""
        return self.num_returned < len(self.children)

    def finished_stats(self, now: float) -> FinishedRequestStats:
        """What the request cost, once every child has finished."""
        lengths = [len(c.token_ids) for c in self.children]
        last_token = max((c.last_token_time for c in self.children), default=0.0) or None
        return FinishedRequestStats.timed(
            self.children[-1].finish_reason or "abort", self.arrival_time, self.scheduled_time, self.first_token_time,
            last_token, now, num_prompt_tokens=len(self.prompt_token_ids), num_generation_tokens=sum(lengths),
            max_num_generation_tokens=max(lengths), n=len(self.children), max_tokens=self.children[0].params.max_tokens,
        )

    def to_output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=self._returned_outputs(),
            finished=self.finished,
            num_cached_tokens=self.num_cached_tokens,
            kv_transfer_params=self.kv_transfer_params,
            prompt_logprobs=self.prompt_logprobs,
        )

    def _returned_outputs(self) -> list[CompletionOutput]:
        """All children, or with best_of > n the n of highest cumulative logprob, best first (as vLLM v0)."""
        outputs = [c.to_output() for c in self.children]
        if not self.selects_best:
            return outputs
        best = sorted(outputs, key=lambda o: o.cumulative_logprob, reverse=True)[: self.num_returned]
        return [dataclasses.replace(o, index=i) for i, o in enumerate(best)]


@dataclass
class ProcessedOutputs:
    request_outputs: list[tuple[ParentState, RequestOutput]]
    to_abort: list[str]  # child ids that finished here (stop strings) but still run in the engine
    stats: IterationStats


class OutputProcessor:
    """`final_only` (the offline API) builds a RequestOutput only when a request finishes, and decodes a child's
    text once at the end unless stop strings need it as it grows."""

    def __init__(self, tokenizer: Any, final_only: bool = False) -> None:
        self.tokenizer = tokenizer
        self.final_only = final_only
        self.parents: dict[str, ParentState] = {}
        self.children: dict[str, tuple[ParentState, ChildState]] = {}
        self._token_text: dict[int, str] = {}

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        queue: Any = None,
    ) -> list[tuple[str, SamplingParams]]:
        """Track a request; returns the (child id, child params) to send to the engine."""
        if request_id in self.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        num_children = params.num_candidates
        ids = child_request_ids(request_id, num_children)
        children = []
        for i in range(num_children):
            cp = child_params(params, i) if num_children > 1 else params
            detok = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
            children.append(ChildState(i, cp, detok, logprobs=[] if cp.logprobs is not None else None,
                                       cumulative_logprob=0.0 if cp.logprobs is not None else None,
                                       shows_logprobs=params.logprobs is not None))
        parent = ParentState(request_id, prompt, prompt_token_ids, children, arrival_time, queue=queue,
                             num_returned=params.n)
        self.parents[request_id] = parent
        for child_id, child in zip(ids, children):
            self.children[child_id] = (parent, child)
        return [(child_id, child.params) for child_id, child in zip(ids, children)]

    def abort_request(self, request_id: str) -> tuple[list[str], IterationStats]:
        """Forget a request; returns its unfinished child ids for the engine to abort, and what it cost."""
        stats = IterationStats()
        parent = self.parents.pop(request_id, None)
        if parent is None:
            return [], stats
        ids = child_request_ids(request_id, len(parent.children))
        for child_id in ids:
            self.children.pop(child_id, None)
        unfinished = [i for i, c in zip(ids, parent.children) if c.finish_reason is None]
        stats.finished_reasons = ["abort"] * len(unfinished)
        stats.e2e_latencies.append(time.time() - parent.arrival_time)
        return unfinished, stats

    def has_unfinished(self) -> bool:
        return bool(self.parents)

    def process_outputs(self, outputs: list[EngineCoreOutput],
                        first_scheduled: dict[str, float] | None = None) -> ProcessedOutputs:
        """`first_scheduled`: engine request id -> when the engine first scheduled it (its scheduler stats)."""
        now = time.time()
        stats = IterationStats()
        updated: dict[str, ParentState] = {}
        to_abort = []
        for child_id, scheduled in (first_scheduled or {}).items():
            entry = self.children.get(child_id)
            if entry is not None and entry[0].scheduled_time is None:
                entry[0].scheduled_time = scheduled
        for out in outputs:
            entry = self.children.get(out.request_id)
            if entry is None:
                continue  # aborted by the front end while the engine was still running it
            parent, child = entry
            self._record_timing(parent, child, out, now, stats)
            parent.kv_transfer_params = out.kv_transfer_params or parent.kv_transfer_params
            if out.prompt_logprobs is not None:
                parent.prompt_logprobs = [None, *(self._logprob_dict(entry) for entry in out.prompt_logprobs)]
            if self._update_child(child, out):
                to_abort.append(out.request_id)
            if child.finish_reason is not None:
                del self.children[out.request_id]
                stats.finished_reasons.append(child.finish_reason)
            updated[parent.request_id] = parent
        results = []
        for parent in updated.values():
            finished = parent.finished
            if finished or not (self.final_only or parent.selects_best):
                results.append((parent, parent.to_output()))
            if finished:
                del self.parents[parent.request_id]
                stats.e2e_latencies.append(now - parent.arrival_time)
                stats.finished_requests.append(parent.finished_stats(now))
        return ProcessedOutputs(results, to_abort, stats)

    def _record_timing(self, parent: ParentState, child: ChildState, out: EngineCoreOutput, now: float,
                       stats: IterationStats) -> None:
        n = len(out.new_token_ids)
        stats.num_generation_tokens += n
        if parent.first_token_time is None and n:
            parent.first_token_time = now
            parent.num_cached_tokens = out.num_cached_tokens
            stats.num_prompt_tokens += len(parent.prompt_token_ids)
            stats.time_to_first_tokens.append(now - parent.arrival_time)
        elif child.last_token_time and n:
            stats.inter_token_latencies.append((now - child.last_token_time) / n)
        if n:
            child.last_token_time = now

    def _update_child(self, child: ChildState, out: EngineCoreOutput) -> bool:
        """Apply one engine output; True when a stop string ended the child here, not in the engine."""
        child.token_ids.extend(out.new_token_ids)
        if out.new_logprobs is not None and child.logprobs is not None:
            for entry in out.new_logprobs:
                child.logprobs.append(self._logprob_dict(entry))
                child.cumulative_logprob += entry[1][0]
        finished = out.finish_reason is not None
        if self.final_only and not child.params.stop:
            if finished:
                child.text = child.detokenizer.decode_all(child.token_ids)
                child.finish_reason, child.stop_reason = out.finish_reason, out.stop_reason
            return False
        delta = child.detokenizer.update(out.new_token_ids, finished)
        child.text += delta
        if child.params.stop and delta:
            hit = find_stop(child.text, len(delta), child.params.stop, child.params.include_stop_str_in_output)
            if hit is not None:
                child.text = child.text[: hit[1]]
                child.finish_reason, child.stop_reason = "stop", hit[0]
                return not finished
        if finished:
            child.finish_reason, child.stop_reason = out.finish_reason, out.stop_reason
        return False

    def _logprob_dict(self, entry: TokenLogprobs) -> dict[int, Logprob]:
        token_ids, logprobs, rank = entry
        d = {token_ids[0]: Logprob(logprobs[0], rank, self._decode_token(token_ids[0]))}
        for r, (tid, lp) in enumerate(zip(token_ids[1:], logprobs[1:]), start=1):
            d.setdefault(tid, Logprob(lp, r, self._decode_token(tid)))
        return d

    def _decode_token(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

"""The engine core's side of structured output: grammars compiled off the step path, matchers, per-step bitmasks.

As in vLLM v1, a constrained request's grammar starts compiling on a thread pool when the request arrives; it
waits in the queue (not admitted, others pass it) until the grammar is ready. The matchers live here, beside the
scheduler: before each bitmask is filled a matcher takes the tokens its request landed since. Each step carries
one bitmask row per sampling position of a constrained request (1 + k with k drafts: row i is the state after
the first i drafts, which are then rolled back) to the runner, which masks the logits before sampling
(`bitmask.py`). The bitmask of step N + 1 needs the token of step N: with the runner in the engine's process the
engine asks for it late (`late_step_data`), while step N + 1's forward runs and once step N has landed, so async
scheduling keeps its overlap; a runner in another process gets it with the step, and the engine lands each step
before scheduling the next while a constrained request runs.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from loomserve.platform.features import SchedulerHook
from loomserve.platform.structured.bitmask import FEATURE, StructuredStep
from loomserve.platform.structured.compiler import BitmaskFiller, GrammarCompiler, Matcher, bitmask_width
from loomserve.platform.structured.grammar import grammar_spec

if TYPE_CHECKING:
    from loomserve.platform.config import EngineConfig, ModelConfig
    from loomserve.platform.request import Request

logger = logging.getLogger(__name__)

_COMPILE_THREADS = 4


@dataclass
class _GrammarState:
    matcher: Future[Matcher]
    num_accepted: int = 0  # output tokens the matcher has advanced past (or seen while reasoning)
    reasoning_end: list[int] | None = None  # the tokens ending the reasoning the output is still in; None: over


@dataclass
class _Sampling:
    request: Request
    drafts: list[int] = field(default_factory=list)


def scheduler_hook(config: EngineConfig) -> StructuredOutputScheduling | None:
    mc = config.model_config
    return StructuredOutputScheduling(mc) if mc.task == "generate" else None


class StructuredOutputScheduling(SchedulerHook):
    name = FEATURE

    def __init__(self, model_config: ModelConfig) -> None:
        self.model_config = model_config
        self.vocab_size = model_config.vocab_size  # the logits width, which the bitmask covers
        self._compiler: GrammarCompiler | None = None
        self._compiler_lock = threading.Lock()
        self.pool: ThreadPoolExecutor | None = None  # started with the first grammar
        self.states: dict[str, _GrammarState] = {}
        self.sampling: list[_Sampling] = []  # this step's constrained requests that sample, in commit order
        self.filler = BitmaskFiller()
        self.late = False  # the bitmask is filled as the step's forward runs, once the step before has landed
        self.late_sampling: list[_Sampling] = []  # the last scheduled step's rows, to fill late

    def add_request(self, request: Request) -> None:
        params = request.sampling_params
        if params is None or params.structured_outputs is None:
            return
        if self.pool is None:
            self.pool = ThreadPoolExecutor(_COMPILE_THREADS, thread_name_prefix="loomserve-grammar")
        self.states[request.request_id] = _GrammarState(self.pool.submit(self._compile, request),
                                                        reasoning_end=params.structured_outputs.reasoning_end_token_ids)

    def _compile(self, request: Request) -> Matcher:
        params = request.sampling_params
        stop_ids = list(params.stop_token_ids)
        if request.eos_token_id is not None and not params.ignore_eos:
            stop_ids.insert(0, request.eos_token_id)
        return self._grammar_compiler().compile(grammar_spec(params.structured_outputs), stop_ids)

    def _grammar_compiler(self) -> GrammarCompiler:
        with self._compiler_lock:  # the first compile thread loads the tokenizer; the others wait for it
            if self._compiler is None:
                from loomserve.platform.input_processor import load_tokenizer

                self._compiler = GrammarCompiler(load_tokenizer(self.model_config), self.vocab_size)
        return self._compiler

    def take_refused(self) -> dict[str, str]:
        """Requests whose grammar failed to compile (the front end validated it, so this is the engine's failure):
        they end, the others run on."""
        refused = {}
        for request_id, state in self.states.items():
            future = state.matcher
            if future.done() and future.exception() is not None:
                logger.error("request %s: its grammar failed to compile: %s", request_id, future.exception())
                refused[request_id] = f"the grammar failed to compile: {future.exception()}"
        return refused

    def admits(self, request: Request) -> bool:
        state = self.states.get(request.request_id)
        return state is None or (state.matcher.done() and state.matcher.exception() is None)

    def allow_late_step_data(self) -> None:
        self.late = True

    def holds_run_ahead(self) -> bool:
        return bool(self.states) and not self.late

    def begin_step(self, running: list[Request]) -> None:
        self.sampling = []

    def commit(self, request: Request, start: int, num_tokens: int) -> None:
        """Note the request's sampling positions when the step reaches its end: its last token and any drafts."""
        if request.request_id not in self.states:
            return
        end = request.num_tokens + request.num_pending_tokens  # the scheduler runs drafts past this
        if start + num_tokens >= end:
            self.sampling.append(_Sampling(request, request.spec_token_ids[: start + num_tokens - end]))

    def step_data(self, running: list[Request]) -> StructuredStep | None:
        if self.late:
            self.late_sampling = self.sampling
            return None
        return self._bitmask(self.sampling)

    def late_step_data(self) -> StructuredStep | None:
        sampling, self.late_sampling = self.late_sampling, []
        return self._bitmask(sampling)

    def _bitmask(self, sampling: list[_Sampling]) -> StructuredStep | None:
        """The rows of the sampling requests still running (one that ended as the step before landed gets rows
        that allow everything: its token is dropped)."""
        if not sampling:
            return None
        starts = [0]
        for s in sampling:
            starts.append(starts[-1] + 1 + len(s.drafts))
        bitmask = torch.full((starts[-1], bitmask_width(self.vocab_size)), -1, dtype=torch.int32)
        decodes = []  # (matcher, row) of the requests without drafts: filled together
        for s, row in zip(sampling, starts, strict=False):
            if s.request.request_id not in self.states:
                continue
            matcher = self._synced(s.request)
            state = self.states[s.request.request_id]
            if state.reasoning_end is not None:  # rows allow everything until reasoning ends, drafts included
                tail = s.request.output_token_ids[len(s.request.output_token_ids) - len(state.reasoning_end) + 1:]
                ended = reasoning_end(tail + s.drafts, state.reasoning_end, len(tail))
                if ended is not None:
                    _fill_draft_rows(matcher, bitmask, row + ended - len(tail), s.drafts[ended - len(tail):])
            elif s.drafts:
                _fill_draft_rows(matcher, bitmask, row, s.drafts)
            else:
                decodes.append((matcher, row))
        self.filler.fill(decodes, bitmask)
        return StructuredStep([s.request.request_id for s in sampling], starts[:-1], bitmask)

    def _synced(self, request: Request) -> Matcher:
        """The request's matcher, advanced past the tokens it landed since the last step."""
        state = self.states[request.request_id]
        matcher = state.matcher.result()
        first = state.num_accepted
        if state.reasoning_end is not None:
            ended = reasoning_end(request.output_token_ids, state.reasoning_end, first)
            if ended is None:
                state.num_accepted = request.num_output_tokens
                return matcher
            state.reasoning_end, first = None, ended
        for token in request.output_token_ids[first:]:
            if not matcher.accept(token):  # the mask allowed it: only a stop token past the grammar's end gets here
                logger.warning("request %s: token %d is outside its grammar", request.request_id, token)
        state.num_accepted = request.num_output_tokens
        return matcher

    def release(self, request: Request) -> None:
        """Keep a preempted request's matcher (its tokens stay); drop a finished one's."""
        if request.status.finished:
            state = self.states.pop(request.request_id, None)
            if state is not None:
                state.matcher.cancel()


def reasoning_end(tokens: list[int], end: list[int], start: int) -> int | None:
    """The index just past the first `end` sequence in `tokens` that finishes at or after `start` (the tokens before
    `start` were searched already), or None."""
    for i in range(max(start + 1, len(end)), len(tokens) + 1):
        if tokens[i - len(end):i] == end:
            return i
    return None


def _fill_draft_rows(matcher: Matcher, bitmask: torch.Tensor, row: int, drafts: list[int]) -> None:
    """Row `row` is what may follow the landed tokens; row row + i + 1 what may follow the first i + 1 drafts. After
    a draft the grammar refuses, the rest copy its row (the draft is rejected there, so they never sample)."""
    matcher.fill(bitmask, row)
    accepted = 0
    for i, token in enumerate(drafts):
        if matcher.accept(token):
            accepted += 1
            matcher.fill(bitmask, row + i + 1)
        else:
            bitmask[row + i + 1 : row + len(drafts) + 1] = bitmask[row + i]
            break
    if accepted:
        matcher.rollback(accepted)

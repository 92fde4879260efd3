"""Verifying a step's drafts: the rejection sampler of Leviathan et al. (2023), exact for every sampling setting.

A request that verifies k drafts has k + 1 rows of target logits: row i is the target's distribution after the
drafts before it. Each row gets the same processing as an ordinary sample (min_tokens, penalties over the output
so far *including the earlier drafts*, temperature, min-p, top-k / top-p), so p_i is exactly the distribution the
token at that position would be drawn from without speculation. Draft i is accepted with probability
min(1, p_i(x) / q_i(x)) (q: the drafter's distribution; a point mass for n-gram drafts); the first rejected row
draws from max(p_i - q_i, 0), renormalised; when every draft is accepted the last row draws a bonus token from
p_k. The emitted tokens then follow the target's distribution exactly. Greedy rows accept a draft iff it is the
argmax, so greedy output is token-identical to no speculation. Seeded rows draw from the generator of their output
position, so a seeded request reproduces. Logprobs are those of the raw logits at each emitted position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from loomserve.platform.request import TokenCounts
from loomserve.platform.sampler import (
    SamplerOutput,
    SamplingMetadata,
    apply_logit_constraints,
    apply_min_tokens,
    apply_penalties,
    gather_logprobs,
    random_sample,
    target_probs,
)

if TYPE_CHECKING:
    from loomserve.platform.input_batch import RequestState
    from loomserve.platform.request import SamplingParams


@dataclass
class DraftBatch:
    """The drafts a step verifies, per sampling request in batch order."""

    num_drafts: list[int]  # [R] 0 for a request that samples one token as usual
    token_ids: torch.Tensor  # [D] int64 on the device, every request's drafts in order
    probs: torch.Tensor | None = None  # [D, V] the drafter's distribution of each draft; None: point masses

    @property
    def num_rows(self) -> int:
        return sum(self.num_drafts) + len(self.num_drafts)


@dataclass(eq=False)
class VerifyRow(TokenCounts):
    """The state a verified position is sampled in: its request with the drafts before it taken as output."""

    state: RequestState
    drafts: list[int]  # the request's drafts before this position

    @property
    def prompt_token_ids(self) -> list[int]:  # type: ignore[override]
        return self.state.prompt_token_ids

    @property
    def output_token_ids(self) -> list[int]:  # type: ignore[override]
        return self.state.output_token_ids + self.drafts

    @property
    def sampling_params(self) -> SamplingParams:
        return self.state.sampling_params

    @property
    def eos_token_id(self) -> int | None:
        return self.state.eos_token_id

    @property
    def sample_index(self) -> int:
        return self.state.sample_index + len(self.drafts)


def verify_rows(states: list[RequestState], drafts: list[list[int]]) -> list[RequestState | VerifyRow]:
    """The sampling rows of a step that verifies drafts: k + 1 per request with k drafts (1 without)."""
    rows: list[RequestState | VerifyRow] = []
    for state, ids in zip(states, drafts, strict=True):
        rows.append(state)
        rows.extend(VerifyRow(state, ids[: i + 1]) for i in range(len(ids)))
    return rows


@dataclass
class _Layout:
    """Where each request's rows sit among the step's N rows (host lists and their device copies)."""

    draft_rows: list[int]  # [D] the row verifying each draft
    bonus_rows: list[int]  # [R] each request's last row
    draft_request: torch.Tensor  # [D] which request each draft belongs to
    draft_offset: torch.Tensor  # [D] its position among the request's drafts

    @classmethod
    def of(cls, num_drafts: list[int], device: torch.device) -> _Layout:
        draft_rows, bonus_rows, request, offset = [], [], [], []
        row = 0
        for r, k in enumerate(num_drafts):
            draft_rows.extend(range(row, row + k))
            request.extend([r] * k)
            offset.extend(range(k))
            row += k
            bonus_rows.append(row)
            row += 1
        tensors = torch.tensor([request, offset], dtype=torch.int64).to(device, non_blocking=True)
        return cls(draft_rows, bonus_rows, tensors[0], tensors[1])


def _row_generators(meta: SamplingMetadata, rows: list[int]) -> dict[int, torch.Generator]:
    """The seeded generators of `rows`, keyed by their index in `rows`."""
    return {j: meta.generators[row] for j, row in enumerate(rows) if row in meta.generators}


def _uniform(n: int, generators: dict[int, torch.Generator], device: torch.device) -> torch.Tensor:
    """[n] uniforms in [0, 1); row j from generators[j] when seeded."""
    u = torch.rand(n, device=device)
    for j, generator in generators.items():
        u[j : j + 1].uniform_(generator=generator)
    return u


class RejectionSampler(nn.Module):
    def __init__(self, synthetic_acceptance_rate: float | None = None) -> None:
        super().__init__()
        # Benchmarks only: accept each draft with this probability whatever the target says.
        self.synthetic_acceptance_rate = synthetic_acceptance_rate

    def forward(
        self, logits: torch.Tensor, meta: SamplingMetadata, drafts: DraftBatch
    ) -> tuple[SamplerOutput, torch.Tensor]:
        """logits [N, V] of the rows of `verify_rows` (meta built over them). Returns each row's token [N] (the
        draft where accepted, else the recovered or bonus token; a request emits its first 1 + accepted rows) with
        its logprobs, and each request's number of emitted tokens [R]."""
        logits = logits.float()
        raw_logprobs = logits.log_softmax(dim=-1) if meta.max_num_logprobs is not None else None  # [N, V]
        logits = apply_logit_constraints(logits, meta.constraints)
        logits = apply_penalties(apply_min_tokens(logits, meta.min_tokens_block), meta)
        layout = _Layout.of(drafts.num_drafts, logits.device)
        greedy = None if meta.all_random else logits.argmax(dim=-1)  # [N]
        probs = None if meta.all_greedy else target_probs(logits, meta)  # [N, V]
        accepted, recovered = self._verify(probs, greedy, meta, layout, drafts)  # [D], [D]
        bonus = self._pick(probs, greedy, meta, layout.bonus_rows)  # [R]
        tokens = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)  # [N]
        tokens[layout.draft_rows] = torch.where(accepted, drafts.token_ids, recovered)
        tokens[layout.bonus_rows] = bonus
        num_emitted = self._num_accepted(accepted, layout, drafts.num_drafts) + 1  # [R]
        if raw_logprobs is None:
            return SamplerOutput(tokens, None, None, None), num_emitted
        return gather_logprobs(raw_logprobs, tokens, meta.max_num_logprobs), num_emitted

    def _verify(
        self, probs: torch.Tensor | None, greedy: torch.Tensor | None, meta: SamplingMetadata, layout: _Layout,
        drafts: DraftBatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Whether each draft is accepted [D] bool, and the token its row emits if it is the first rejected [D]."""
        rows, x = layout.draft_rows, drafts.token_ids
        generators = _row_generators(meta, rows)
        u = _uniform(len(rows), generators, x.device)  # [D]
        recovered = None
        if probs is not None:
            p = probs[rows]  # [D, V]
            p_x = p.gather(1, x[:, None])[:, 0]  # [D]
            if drafts.probs is None:  # a point mass at x: accept with p(x), else draw from p without x
                accept = u < p_x
                residual = p.scatter_(1, x[:, None], 0.0)
            else:
                q = drafts.probs.float()
                accept = u * q.gather(1, x[:, None])[:, 0] < p_x  # u < p(x) / q(x), without dividing by 0
                residual = (p - q).clamp_min_(0.0)
            recovered = random_sample(residual, generators)  # [D]
        if greedy is not None:
            is_greedy = meta.temperature[rows] == 0  # [D]
            greedy_rows = greedy[rows]
            accept = greedy_rows == x if probs is None else torch.where(is_greedy, greedy_rows == x, accept)
            recovered = greedy_rows if recovered is None else torch.where(is_greedy, greedy_rows, recovered)
        if self.synthetic_acceptance_rate is not None:
            accept = u < self.synthetic_acceptance_rate
        return accept, recovered

    def _pick(
        self, probs: torch.Tensor | None, greedy: torch.Tensor | None, meta: SamplingMetadata, rows: list[int]
    ) -> torch.Tensor:
        """An ordinary sample of each of `rows` (the bonus tokens)."""
        if probs is None:
            return greedy[rows]
        sampled = random_sample(probs[rows], _row_generators(meta, rows))
        if greedy is None:
            return sampled
        return torch.where(meta.temperature[rows] > 0, sampled, greedy[rows])

    @staticmethod
    def _num_accepted(accepted: torch.Tensor, layout: _Layout, num_drafts: list[int]) -> torch.Tensor:
        """[R] how many of each request's drafts were accepted before its first rejection."""
        table = torch.zeros(len(num_drafts), max(num_drafts), dtype=torch.int64, device=accepted.device)  # [R, k]
        table[layout.draft_request, layout.draft_offset] = accepted.long()
        return table.cumprod(dim=1).sum(dim=1)

"""What the proposers that run a model of their own share (a draft model, an EAGLE-3 head).

Their KV cache is their own (their layers, heads and head size) but lives in the target's block ids, so it holds
whatever the target's does for the same positions. Once a step's tokens land, they decode k times for each request,
drawing each draft from their own distribution q (the request's temperature, penalties and filters over the
drafter's logits; the argmax for greedy requests), and keep q for the rejection sampler of the step that verifies
the drafts. Drafts' KV goes to slots past the step's tokens, which the scheduler books ahead
(`num_lookahead_tokens`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from loomserve.platform.attention import AttentionMetadata
from loomserve.platform.sampler import (
    SamplingMetadata,
    apply_min_tokens,
    apply_penalties,
    build_sampling_metadata,
    random_sample,
    step_generator,
    target_probs,
)
from loomserve.platform.spec_decode.proposer import LandedStep, Proposer

if TYPE_CHECKING:
    from loomserve.platform.input_batch import BatchInputs, RequestState

_DRAFT_STREAM = 1 << 40  # seeded drafts draw from generators no target position uses


class ModelProposer(Proposer):
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, vocab_size: int,
                 block_size: int, device: torch.device) -> None:
        self.kv_shape = (num_layers, num_kv_heads, head_dim)
        self.dtype = dtype
        self.vocab_size = vocab_size  # the target's: drafts and their q are over its token ids
        self.block_size = block_size
        self.device = device
        self.kv_caches: list[torch.Tensor] = []
        self.probs: dict[str, torch.Tensor | None] = {}  # request id -> [k, V] its drafts' q; None: greedy
        self.block_tables: dict[str, torch.Tensor] = {}  # request id -> its block table row of the last step
        # While drafting: the requests' block tables [R, width] and last landed positions.
        self._rows_tables: torch.Tensor | None = None
        self._last: list[int] = []

    def kv_bytes_per_block(self) -> int:
        num_layers, num_kv_heads, head_dim = self.kv_shape
        return 2 * num_layers * self.block_size * num_kv_heads * head_dim * self.dtype.itemsize

    def init_kv_cache(self, num_blocks: int) -> None:
        num_layers, num_kv_heads, head_dim = self.kv_shape
        shape = (2, num_blocks, self.block_size, num_kv_heads, head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(num_layers)]

    def release(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.probs.pop(request_id, None)
            self.block_tables.pop(request_id, None)

    def prepare(self, batch: BatchInputs) -> None:
        """Remember the sampling requests' block tables for the drafting after the step lands, and hand the
        rejection sampler the q of the drafts the step verifies."""
        tables = batch.forward.attn.block_tables
        rows = {s.request_id: i for i, s in enumerate(batch.scheduled)}
        for state in batch.sample_requests:
            self.block_tables[state.request_id] = tables[rows[state.request_id]]
        if batch.spec is not None:
            batch.spec.probs = self._verified_probs(batch)

    def _verified_probs(self, batch: BatchInputs) -> torch.Tensor | None:
        """[D, V] the q of each draft the step verifies (a greedy request's are ignored: zeros); None if all are
        greedy."""
        qs = [(self.probs.get(s.request_id), len(d)) for s, d in zip(batch.sample_requests, batch.drafts) if d]
        if all(q is None for q, _ in qs):
            return None
        return torch.cat([q[:n] if q is not None else torch.zeros(n, self.vocab_size, device=self.device)
                          for q, n in qs])

    @torch.inference_mode()
    def propose(self, states: list[RequestState], caps: list[int], landed: LandedStep) -> list[list[int]]:
        live = [i for i, cap in enumerate(caps) if cap > 0]
        drafts: list[list[int]] = [[] for _ in states]
        if not live:
            return drafts
        rows = [states[i] for i in live]
        meta = build_sampling_metadata(rows, self.vocab_size, self.device)
        steps, probs = [], []
        k = max(caps)
        logits = self._first_logits(rows, landed)  # [R, V]
        for j in range(k):
            tokens, q = self._draw(logits, meta, rows, j)
            steps.append(tokens)
            probs.append(q)
            if j + 1 < k:
                logits = self._next_logits(tokens, j + 1)
        drafted = torch.stack(steps, dim=1).tolist()  # [R, k]
        q_all = None if probs[0] is None else torch.stack(probs, dim=1)  # [R, k, V]
        for n, i in enumerate(live):
            drafts[i] = drafted[n][: caps[i]]
            greedy = states[i].sampling_params.greedy
            self.probs[states[i].request_id] = None if greedy or q_all is None else q_all[n, : caps[i]]
        return drafts

    def _first_logits(self, rows: list[RequestState], landed: LandedStep) -> torch.Tensor:
        """The logits [R, V] of each request's first draft; sets up what `_next_logits` continues from."""
        raise NotImplementedError

    def _next_logits(self, tokens: torch.Tensor, j: int) -> torch.Tensor:
        """The logits [R, V] of each request's draft j, given its draft j - 1 `tokens` [R]."""
        raise NotImplementedError

    def _start_drafting(self, rows: list[RequestState]) -> None:
        self._rows_tables = torch.stack([self.block_tables[s.request_id] for s in rows])  # [R, width]
        self._last = [s.num_tokens - 1 for s in rows]

    def _decode_attention(self, positions: torch.Tensor, tables: torch.Tensor, seq_lens: list[int]
                          ) -> AttentionMetadata:
        """Attention metadata of one token per request at `positions` [R] (`seq_lens`: positions + 1 on the host)."""
        n = positions.shape[0]
        bs = self.block_size
        slots = tables.gather(1, (positions // bs)[:, None])[:, 0] * bs + positions % bs  # [R]
        return AttentionMetadata(
            slot_mapping=slots,
            query_start_loc=torch.arange(n + 1, device=self.device),
            seq_lens=positions + 1,
            block_tables=tables,
            seq_counts=torch.tensor([n, n], device=self.device),
            num_decodes=n,
            num_decode_tokens=n,
            query_start_loc_cpu=list(range(n + 1)),
            seq_lens_cpu=seq_lens,
        )

    def _draw(self, logits: torch.Tensor, meta: SamplingMetadata, rows: list[RequestState], j: int
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each request's j-th draft [R] and the distribution q it was drawn from [R, V] (None when all greedy)."""
        logits = apply_penalties(apply_min_tokens(logits, meta.min_tokens_block), meta)
        greedy = None if meta.all_random else logits.argmax(dim=-1)
        if meta.all_greedy:
            return greedy, None
        q = target_probs(logits, meta)
        generators = {i: step_generator(rows[i].sampling_params.seed + _DRAFT_STREAM, rows[i].num_sampled + j,
                                        self.device)
                      for i in meta.generators}
        sampled = random_sample(q.clone(), generators)
        if greedy is not None:
            sampled = torch.where(meta.temperature > 0, sampled, greedy)
        return sampled, q

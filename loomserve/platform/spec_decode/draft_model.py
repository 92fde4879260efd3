"""The draft-model proposer: a second, smaller checkpoint with the target's tokenizer drafts k tokens per request.

Its KV cache is its own (its layers, heads and head size) but lives in the target's block ids: every step the draft
runs over the same flat batch as the target (same slots, same attention metadata, no adapter, no media
embeddings), so its cache holds whatever the target's does, prefix-cache hits included. Once a step's tokens land,
it decodes k times from each request's last token, drawing each draft from its own distribution q (the request's
temperature, penalties and filters over the draft's logits; the argmax for greedy requests), and keeps q for the
rejection sampler. Its drafts' KV goes to slots past the step's tokens, which the scheduler books ahead
(`num_lookahead_tokens`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from loomserve.platform.attention import AttentionMetadata
from loomserve.platform.forward_batch import ForwardBatch
from loomserve.platform.sampler import (
    SamplingMetadata,
    apply_min_tokens,
    apply_penalties,
    build_sampling_metadata,
    random_sample,
    step_generator,
    target_probs,
)
from loomserve.platform.spec_decode.proposer import Proposer

if TYPE_CHECKING:
    from loomserve.platform.config import EngineConfig, SpeculativeConfig
    from loomserve.platform.input_batch import BatchInputs, RequestState

_DRAFT_STREAM = 1 << 40  # seeded drafts draw from generators no target position uses


class DraftModelProposer(Proposer):
    def __init__(self, spec: SpeculativeConfig, config: EngineConfig, device: torch.device) -> None:
        from transformers import AutoConfig

        from loomserve.platform.loader import load_model

        mc = config.model_config
        self.model_config = dataclasses.replace(
            mc, model=spec.model, tokenizer=spec.model, hf_config=AutoConfig.from_pretrained(spec.model),
            quantization=None, task="generate", encoder_only=False, pooler_config=None,
        )
        self.model = load_model(self.model_config, config.attention_backend)
        self.device = device
        self.block_size = config.cache_config.block_size
        self.kv_caches: list[torch.Tensor] = []
        self.probs: dict[str, torch.Tensor | None] = {}  # request id -> [k, V] its drafts' q; None: greedy
        self.block_tables: dict[str, torch.Tensor] = {}  # request id -> its block table row of the last step

    def kv_bytes_per_block(self) -> int:
        mc = self.model_config
        return 2 * mc.num_layers * self.block_size * mc.num_kv_heads * mc.head_dim * mc.dtype.itemsize

    def init_kv_cache(self, num_blocks: int) -> None:
        mc = self.model_config
        shape = (2, num_blocks, self.block_size, mc.num_kv_heads, mc.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=mc.dtype, device=self.device) for _ in range(mc.num_layers)]

    def release(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.probs.pop(request_id, None)
            self.block_tables.pop(request_id, None)

    @torch.inference_mode()
    def prepare(self, batch: BatchInputs) -> None:
        """Run the draft over the step's tokens (its KV follows the target's), remember the sampling requests'
        block tables for the drafting after the step lands, and hand the rejection sampler the drafts' q."""
        forward = batch.forward
        self.model(batch.input_ids, self.kv_caches, ForwardBatch(forward.attn, forward.positions))
        tables = forward.attn.block_tables
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
        vocab_size = self.model_config.vocab_size
        return torch.cat([q[:n] if q is not None else torch.zeros(n, vocab_size, device=self.device) for q, n in qs])

    @torch.inference_mode()
    def propose(self, states: list[RequestState], caps: list[int]) -> list[list[int]]:
        live = [i for i, cap in enumerate(caps) if cap > 0]
        drafts: list[list[int]] = [[] for _ in states]
        if not live:
            return drafts
        rows = [states[i] for i in live]
        tables = torch.stack([self.block_tables[s.request_id] for s in rows])  # [R, width]
        meta = build_sampling_metadata(rows, self.model_config.vocab_size, self.device)
        tokens = torch.tensor([s.output_token_ids[-1] for s in rows], device=self.device)  # [R]
        start = torch.tensor([s.num_tokens - 1 for s in rows], device=self.device)  # [R] the last token's position
        steps, probs = [], []
        for j in range(max(caps)):
            logits = self._decode(tokens, start + j, tables, [s.num_tokens + j for s in rows])  # [R, V]
            tokens, q = self._draw(logits, meta, rows, j)
            steps.append(tokens)
            probs.append(q)
        drafted = torch.stack(steps, dim=1).tolist()  # [R, k]
        q_all = None if probs[0] is None else torch.stack(probs, dim=1)  # [R, k, V]
        for n, i in enumerate(live):
            drafts[i] = drafted[n][: caps[i]]
            greedy = states[i].sampling_params.greedy
            self.probs[states[i].request_id] = None if greedy or q_all is None else q_all[n, : caps[i]]
        return drafts

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor,
                seq_lens: list[int]) -> torch.Tensor:
        """One draft token per request at `positions` [R]: its logits [R, V]."""
        n = tokens.shape[0]
        bs = self.block_size
        slots = tables.gather(1, (positions // bs)[:, None])[:, 0] * bs + positions % bs  # [R]
        attn = AttentionMetadata(
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
        hidden = self.model(tokens, self.kv_caches, ForwardBatch(attn, positions))
        return self.model.compute_logits(hidden).float()

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

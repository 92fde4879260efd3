"""From the last-position logits of each request to its next token, like vLLM v1's sampler.

Order per step: raw logprobs (if asked) -> allowed_token_ids / bad_words / logit_bias -> min_tokens mask ->
repetition / frequency / presence penalties -> greedy argmax -> temperature -> min-p -> top-k / top-p ->
exponential-race sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from loomserve.platform.logit_constraints import LogitConstraints, apply_logit_constraints, build_logit_constraints
from loomserve.platform.request import SamplingParams, resolve_num_logprobs

if TYPE_CHECKING:
    from loomserve.platform.input_batch import RequestState

_SEED_MIX = 1_000_003  # a seeded row's generator at a step is seeded with seed * _SEED_MIX + step


@dataclass
class SamplingMetadata:
    """Per-step tensors for B rows (one per request), built once per step."""

    temperature: torch.Tensor  # [B] float32, 0 for greedy rows
    all_greedy: bool
    all_random: bool
    top_k: torch.Tensor | None  # [B] int64, 0 = off; None when no row uses it
    top_p: torch.Tensor | None  # [B] float32; None when all 1.0
    min_p: torch.Tensor | None  # [B] float32; None when all 0.0
    repetition_penalty: torch.Tensor | None  # [B] float32; None when all 1.0
    presence_penalty: torch.Tensor | None  # [B] float32; None when all 0.0
    frequency_penalty: torch.Tensor | None  # [B] float32; None when all 0.0
    output_token_counts: torch.Tensor | None  # [B, V] int32, filled for penalized rows; None if none
    prompt_token_mask: torch.Tensor | None  # [B, V] bool, filled for repetition-penalized rows
    min_tokens_block: torch.Tensor | None  # [2, N] int64: (row, token id) pairs banned by min_tokens
    generators: dict[int, torch.Generator]  # row -> generator, for seeded random rows
    max_num_logprobs: int | None  # None when no row asked for logprobs
    constraints: LogitConstraints | None = None  # logit_bias, allowed_token_ids, bad_words; None when no row has any


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [B] int64
    logprob_token_ids: torch.Tensor | None  # [B, K+1]: sampled token then the top-K (K = max_num_logprobs)
    logprobs: torch.Tensor | None  # [B, K+1] float32, of the raw logits
    sampled_token_ranks: torch.Tensor | None  # [B] int64, 1 = most likely


def build_sampling_metadata(
    requests: list[RequestState], vocab_size: int, device: torch.device
) -> SamplingMetadata:
    """Gather the sampling settings of this step's requests (one row each, in order) into tensors."""
    params = [r.sampling_params for r in requests]
    greedy = [p.greedy for p in params]
    # Filters cannot change an argmax, so greedy rows leave them off (and skip the sort).
    top_k = [0 if g or p.top_k >= vocab_size else p.top_k for p, g in zip(params, greedy, strict=True)]
    top_p = [1.0 if g else p.top_p for p, g in zip(params, greedy, strict=True)]
    min_p = [0.0 if g else p.min_p for p, g in zip(params, greedy, strict=True)]
    repetition = [p.repetition_penalty for p in params]
    presence = [p.presence_penalty for p in params]
    frequency = [p.frequency_penalty for p in params]

    penalized = [i for i, p in enumerate(params) if _uses_penalty(p)]
    counts = mask = None
    if penalized:
        index = _flat_token_index([r.output_token_ids for r in requests], penalized, vocab_size, device)
        counts = torch.zeros(len(requests) * vocab_size, dtype=torch.int32, device=device)  # [B * V]
        counts = counts.scatter_add_(0, index, torch.ones_like(index, dtype=torch.int32)).view(-1, vocab_size)
        rep_rows = [i for i in penalized if params[i].repetition_penalty != 1.0]
        if rep_rows:
            index = _flat_token_index([r.prompt_token_ids for r in requests], rep_rows, vocab_size, device)
            mask = torch.zeros(len(requests) * vocab_size, dtype=torch.bool, device=device)  # [B * V]
            mask = mask.index_fill_(0, index, True).view(-1, vocab_size)

    num_logprobs = [resolve_num_logprobs(p.logprobs, vocab_size) for p in params if p.logprobs is not None]
    return SamplingMetadata(
        temperature=to_device([0.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)],
                              torch.float32, device),
        all_greedy=all(greedy),
        all_random=not any(greedy),
        top_k=_tensor_unless(top_k, 0, torch.int64, device),
        top_p=_tensor_unless(top_p, 1.0, torch.float32, device),
        min_p=_tensor_unless(min_p, 0.0, torch.float32, device),
        repetition_penalty=_tensor_unless(repetition, 1.0, torch.float32, device),
        presence_penalty=_tensor_unless(presence, 0.0, torch.float32, device),
        frequency_penalty=_tensor_unless(frequency, 0.0, torch.float32, device),
        output_token_counts=counts,
        prompt_token_mask=mask,
        min_tokens_block=_min_tokens_block(requests, vocab_size, device),
        generators={
            i: step_generator(p.seed, r.sample_index, device)
            for i, (r, p, g) in enumerate(zip(requests, params, greedy, strict=True))
            if p.seed is not None and not g
        },
        max_num_logprobs=max(num_logprobs) if num_logprobs else None,
        constraints=build_logit_constraints(requests, vocab_size, device),
    )


def _tensor_unless(values: list, off: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """[B] tensor of `values`, or None when every row has the no-op value `off`."""
    if all(v == off for v in values):
        return None
    return to_device(values, dtype, device)


def to_device(values: Sequence | np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values as a device tensor without a blocking copy (a blocking one would wait for the GPU's queue)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _uses_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _flat_token_index(
    token_lists: list[list[int]], rows: list[int], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """[N] int64: row * V + token for every token of token_lists[row], for the given rows."""
    tokens = torch.tensor(list(chain.from_iterable(token_lists[i] for i in rows)), dtype=torch.int64)  # [N]
    lengths = torch.tensor([len(token_lists[i]) for i in rows])  # [R]
    row_ids = torch.repeat_interleave(torch.tensor(rows, dtype=torch.int64), lengths)  # [N]
    # Ids past the logits (an embedding vocab larger than the lm_head) can never be sampled: skip them.
    keep = tokens < vocab_size
    return (row_ids[keep] * vocab_size + tokens[keep]).to(device)


def _min_tokens_block(requests: list[RequestState], vocab_size: int, device: torch.device) -> torch.Tensor | None:
    """[2, N] (row, token id) pairs: eos and stop ids of rows still short of min_tokens."""
    pairs = []
    for i, r in enumerate(requests):
        p = r.sampling_params
        if r.num_output_tokens >= p.min_tokens:
            continue
        stop_ids = list(p.stop_token_ids)
        if r.eos_token_id is not None and not p.ignore_eos:
            stop_ids.append(r.eos_token_id)
        pairs.extend((i, t) for t in stop_ids if 0 <= t < vocab_size)
    if not pairs:
        return None
    return to_device(pairs, torch.int64, device).T


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """A generator for a seeded request's `step`-th output token: the same across batches and recomputes."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * _SEED_MIX + step) % 2**63)
    return generator


class Sampler(nn.Module):
    def forward(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """logits: [B, V], the last position of each request; left unchanged."""
        logits = logits.float()
        raw_logprobs = logits.log_softmax(dim=-1) if meta.max_num_logprobs is not None else None  # [B, V]
        logits = apply_logit_constraints(logits, meta.constraints)
        logits = apply_min_tokens(logits, meta.min_tokens_block)
        logits = apply_penalties(logits, meta)
        sampled = self.sample(logits, meta)  # [B]
        if raw_logprobs is None:
            return SamplerOutput(sampled, None, None, None)
        return gather_logprobs(raw_logprobs, sampled, meta.max_num_logprobs)

    def sample(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        greedy = None if meta.all_random else logits.argmax(dim=-1)  # [B]
        if meta.all_greedy:
            return greedy
        sampled = random_sample(target_probs(logits, meta), meta.generators)  # [B]
        if greedy is None:
            return sampled
        return torch.where(meta.temperature > 0, sampled, greedy)


def target_probs(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """[B, V] the distribution each random row draws from: temperature, min-p, top-k / top-p, softmax (greedy rows
    get their temperature-1 distribution, which the caller ignores). A new tensor; `logits` is left as it is."""
    temperature = torch.where(meta.temperature > 0, meta.temperature, 1.0)  # [B]
    logits = logits / temperature.unsqueeze(1)  # [B, V], our own copy: the steps below write in place
    logits = apply_min_p(logits, meta.min_p)
    logits = apply_top_k_top_p(logits, meta.top_k, meta.top_p)
    return logits.softmax(dim=-1)


def apply_min_tokens(logits: torch.Tensor, block: torch.Tensor | None) -> torch.Tensor:
    """Ban eos / stop ids of rows still short of min_tokens (a new tensor; the caller's stays raw)."""
    if block is None:
        return logits
    return logits.index_put(tuple(block), torch.tensor(-float("inf"), device=logits.device))


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Repetition penalty on prompt and output tokens (as HF); frequency/presence on output (as OpenAI).

    Returns a new tensor; `logits` is left as it is.
    """
    counts = meta.output_token_counts
    if counts is None:
        return logits
    in_output = counts > 0  # [B, V]
    if meta.repetition_penalty is not None:
        seen = in_output | meta.prompt_token_mask  # [B, V]
        penalty = meta.repetition_penalty.unsqueeze(1)  # [B, 1]
        logits = torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
    if meta.frequency_penalty is not None:
        logits = logits - meta.frequency_penalty.unsqueeze(1) * counts
    if meta.presence_penalty is not None:
        logits = logits - meta.presence_penalty.unsqueeze(1) * in_output
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor | None) -> torch.Tensor:
    """In place: drop tokens whose probability is below min_p times the top one's (in logit space)."""
    if min_p is None:
        return logits
    max_logits = logits.amax(dim=-1, keepdim=True)  # [B, 1]
    return logits.masked_fill_(logits - max_logits < min_p.log().unsqueeze(1), -float("inf"))


def apply_top_k_top_p(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None) -> torch.Tensor:
    """In place: keep each row's k most likely tokens (k <= 0: all), then its smallest nucleus >= p."""
    if k is None and p is None:
        return logits
    vocab_size = logits.shape[1]
    if k is not None:
        k = torch.where((k <= 0) | (k > vocab_size), vocab_size, k)  # [B], in 1..V
    if p is None:
        return _apply_top_k_only(logits, k)
    logits_sort, order = logits.sort(dim=-1)  # [B, V] ascending
    if k is not None:
        kth = logits_sort.gather(1, (vocab_size - k).unsqueeze(1))  # [B, 1]
        logits_sort.masked_fill_(logits_sort < kth, -float("inf"))
    cum_probs = logits_sort.softmax(dim=-1).cumsum(dim=-1)  # [B, V]
    drop = cum_probs <= 1 - p.unsqueeze(1)
    drop[:, -1] = False  # keep at least the top token
    logits_sort.masked_fill_(drop, -float("inf"))
    return logits.scatter_(1, order, logits_sort)


def _apply_top_k_only(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Top-k without a full sort: one topk of the largest k in the batch."""
    top = logits.topk(int(k.max()), dim=-1).values  # [B, max_k] descending
    kth = top.gather(1, (k - 1).unsqueeze(1))  # [B, 1]
    return logits.masked_fill_(logits < kth, -float("inf"))


def random_sample(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """argmax(probs / q), q ~ Exp(1) per row: a draw from probs that depends on nothing else in the batch."""
    u = torch.empty_like(probs)  # [B, V] uniform in [0, 1)
    if len(generators) < probs.shape[0]:
        u.uniform_()
    for row, generator in generators.items():
        u[row].uniform_(generator=generator)
    # -log(u) is Exp(1) and never 0 (u < 1), so a banned token's 0 / q stays 0; much faster than
    # exponential_ on CPU.
    q = u.log_().neg_()  # [B, V]
    return probs.div_(q).argmax(dim=-1)


def gather_logprobs(logprobs: torch.Tensor, sampled: torch.Tensor, k: int) -> SamplerOutput:
    """The sampled token's logprob and rank, then the top-k tokens and theirs, from raw logprobs [B, V]."""
    top_logprobs, top_ids = logprobs.topk(min(k, logprobs.shape[1]), dim=-1)  # [B, K]
    sampled_logprobs = logprobs.gather(1, sampled.unsqueeze(1))  # [B, 1]
    ranks = (logprobs >= sampled_logprobs).sum(dim=-1)  # [B]
    return SamplerOutput(
        sampled_token_ids=sampled,
        logprob_token_ids=torch.cat([sampled.unsqueeze(1), top_ids], dim=1),
        logprobs=torch.cat([sampled_logprobs, top_logprobs], dim=1),
        sampled_token_ranks=ranks,
    )

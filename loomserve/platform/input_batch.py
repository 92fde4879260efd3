"""The runner's own view of the requests it runs, and the packing of a step into one flat batch.

The runner learns a request once (`NewRequest`) and keeps it here: its tokens (the prompt plus every token it
sampled, which it appends itself when a step lands), its block table row, its media positions. Each step
applies the scheduler's diff (new blocks, resumed tables, finished and preempted ids) and packs its tokens:
decodes first, so the attention backend can treat them together, no padding. A token sampled by the step
still in flight exists only on the device; the packing reads it from there (`previous_sampled`). A request that
verifies drafts runs its last token and the drafts after it, and samples at every one of those positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from loomserve.platform.attention import AttentionMetadata
from loomserve.platform.block_table import BlockTable
from loomserve.platform.forward_batch import ForwardBatch
from loomserve.platform.kv_cache.manager import cdiv
from loomserve.platform.request import TokenCounts
from loomserve.platform.spec_decode.rejection_sampler import DraftBatch
from loomserve.platform.step import NewRequest, ScheduledRequest, ScheduledStep

if TYPE_CHECKING:
    from loomserve.adapters.request import LoRARequest
    from loomserve.modalities.inputs import MultiModalItem
    from loomserve.platform.models.mrope import MRopePositions
    from loomserve.platform.request import SamplingParams
    from loomserve.pooling.batch import PoolingSpan
    from loomserve.pooling.params import PoolingParams


@dataclass(eq=False)
class RequestState(TokenCounts):
    """What the runner keeps about one request between steps."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams | None
    eos_token_id: int | None
    pooling_params: PoolingParams | None
    lora_request: LoRARequest | None
    mm_items: list[MultiModalItem]
    output_token_ids: list[int] = field(default_factory=list)  # landed tokens, appended by the runner
    num_sampled: int = 0  # tokens sampled so far, landed or still in flight
    mm_positions: MRopePositions | None = None  # M-RoPE prompt positions, computed when first needed

    @classmethod
    def of(cls, new: NewRequest) -> RequestState:
        return cls(new.request_id, new.prompt_token_ids, new.sampling_params, new.eos_token_id, new.pooling_params,
                   new.lora_request, new.mm_items)

    @property
    def sample_index(self) -> int:
        """While a step runs: how many output tokens come before the one it samples."""
        return self.num_sampled - 1

    def token_at(self, position: int) -> int:
        """One token without building the whole token list (the decode hot path)."""
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]

    def tokens(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        return (self.prompt_token_ids + self.output_token_ids)[start:end]


@dataclass
class BatchInputs:
    input_ids: torch.Tensor  # [T] int64
    forward: ForwardBatch  # the model's argument: attention metadata, positions; the features add theirs
    logits_indices: torch.Tensor  # [S] int64: the positions that sample (the last, or 1 + k verifying k drafts)
    sample_requests: list[RequestState]
    scheduled: list[ScheduledRequest]  # the step's requests in batch order (decodes first)
    requests: list[RequestState]  # their states, in the same order
    pooling: list[PoolingSpan] = field(default_factory=list)  # the requests whose prompt ends this step and pools
    drafts: list[list[int]] = field(default_factory=list)  # per sampling request, the drafts it verifies
    spec: DraftBatch | None = None  # the drafts on the device, when any request verifies some


class InputBatch:
    def __init__(self, max_num_seqs: int, max_model_len: int, block_size: int, device: torch.device,
                 num_lookahead_tokens: int = 0, uses_kv_cache: bool = True) -> None:
        self.block_size = block_size
        self.uses_kv_cache = uses_kv_cache  # False (an encoder): no block tables, no slots
        self.num_lookahead_tokens = num_lookahead_tokens  # a draft model's slots past the step's: its tables cover them
        self.device = device
        self.requests: dict[str, RequestState] = {}
        self.block_table = BlockTable(max_num_seqs, cdiv(max_model_len, block_size))
        self.previous_sampled = torch.zeros(0, dtype=torch.long, device=device)  # [S] last launch's tokens
        self.previous_rows: dict[str, int] = {}  # request id -> its row in previous_sampled

    def apply(self, step: ScheduledStep) -> list[str]:
        """Take in the step's diff; returns the ids of the requests forgotten (finished)."""
        for request_id in step.preempted_ids:
            self.block_table.release(request_id)
        forgotten = [i for i in step.finished_ids if self.requests.pop(i, None) is not None]
        for request_id in forgotten:
            self.block_table.release(request_id)
        for new in step.new_requests:
            self.requests[new.request_id] = RequestState.of(new)
        return forgotten

    def land(self, sampled: dict[str, list[int]]) -> None:
        """Append a landed step's tokens to their requests (those not forgotten since). The step counted one token
        sampled per request; verified drafts add the rest."""
        for request_id, tokens in sampled.items():
            state = self.requests.get(request_id)
            if state is not None:
                state.output_token_ids.extend(tokens)
                state.num_sampled += len(tokens) - 1

    def keep_sampled(self, sampled: torch.Tensor, rows: list[RequestState]) -> None:
        """The launched step's tokens [S], read by the next step's packing while they are still in flight."""
        self.previous_sampled = sampled
        self.previous_rows = {r.request_id: i for i, r in enumerate(rows)}

    def prepare(self, step: ScheduledStep) -> BatchInputs:
        """Pack the step's tokens, decodes first; everything the device needs goes over in one int64 host buffer and
        one copy. The per-request loop gathers token ids only: positions, slots and offsets are computed for the
        whole batch at once (a step of a thousand short prompts is a thousand loop turns, not a thousand aranges)."""
        scheduled = sorted(step.scheduled, key=lambda s: s.num_new_tokens != 1)
        ids: list[int] = []
        starts, lens, rows, states = [], [], [], []
        logits_indices: list[int] = []
        sample_requests, drafts = [], []
        from_previous: list[tuple[int, int]] = []  # (batch position, previous step's row): tokens in flight
        num_tokens = num_decodes = 0
        for s in scheduled:
            state, start, n = self.requests[s.request_id], s.start, s.num_new_tokens
            if self.uses_kv_cache:
                rows.append(self.block_table.append(s.request_id, s.new_block_ids, replace=s.resumed))
            states.append(state)
            starts.append(start)
            lens.append(n)
            if n == 1:  # the decode hot path: scalars only
                num_decodes += 1
                if start < state.num_tokens:
                    ids.append(state.token_at(start))
                else:
                    from_previous.append((num_tokens, self.previous_rows[s.request_id]))
                    ids.append(0)
            else:
                ids.extend(state.tokens(start, start + n - len(s.spec_token_ids)))
                ids.extend(s.spec_token_ids)
            num_tokens += n
            if s.samples:
                logits_indices.extend(range(num_tokens - 1 - len(s.spec_token_ids), num_tokens))
                sample_requests.append(state)
                drafts.append(s.spec_token_ids)
                state.num_sampled += 1
        layout = _pack_layout(np.array(starts, dtype=np.int64), np.array(lens, dtype=np.int64))
        slots, tables = self._slots_and_tables(rows, layout)
        num_seqs = len(scheduled)
        at, prev = (list(x) for x in zip(*from_previous)) if from_previous else ([], [])
        draft_ids = [t for d in drafts for t in d]
        host = np.concatenate([
            np.array(ids, dtype=np.int64),
            layout.positions,
            slots,
            layout.query_start_loc,
            layout.seq_lens,
            np.array([num_decodes, num_seqs] + logits_indices + at + prev + draft_ids, dtype=np.int64),
            tables.ravel(),
        ])
        # One non-blocking copy: a blocking one would first wait for the step still running on the GPU.
        dev = torch.from_numpy(host).to(self.device, non_blocking=True)
        sizes = [num_tokens, num_tokens, len(slots), num_seqs + 1, num_seqs, 2, len(logits_indices), len(at), len(prev),
                 len(draft_ids)]
        parts = torch.tensor_split(dev, np.cumsum(sizes).tolist())
        input_ids, pos_t, slot_t, qsl_t, seq_lens_t, counts_t, logits_t, at_t, prev_t, drafts_t, tables_t = parts
        attn = AttentionMetadata(
            slot_mapping=slot_t,
            query_start_loc=qsl_t,
            seq_lens=seq_lens_t,
            block_tables=tables_t.view(num_seqs, tables.shape[1]),
            seq_counts=counts_t,
            num_decodes=num_decodes,
            num_decode_tokens=num_decodes,
            query_start_loc_cpu=layout.query_start_loc.tolist(),
            seq_lens_cpu=layout.seq_lens.tolist(),
        )
        if from_previous:  # fill in tokens that exist only on the device so far
            input_ids[at_t] = self.previous_sampled[prev_t]
        spec = DraftBatch([len(d) for d in drafts], drafts_t) if draft_ids else None
        return BatchInputs(input_ids, ForwardBatch(attn, pos_t), logits_t, sample_requests, scheduled, states,
                           drafts=drafts, spec=spec)

    def _slots_and_tables(self, rows: list[int], layout: PackLayout) -> tuple[np.ndarray, np.ndarray]:
        """The KV slot of every token [T] and the step's block tables [B, width]; none for a model without KV (an
        encoder: its attention reads only the sequences' offsets)."""
        if not self.uses_kv_cache:
            return np.zeros(0, dtype=np.int64), np.zeros((len(layout.seq_lens), 0), dtype=np.int64)
        bs, table = self.block_size, self.block_table.table
        pos = layout.positions
        slots = table[np.repeat(rows, layout.lens), pos // bs] * bs + pos % bs  # [T]
        width = min(cdiv(int(layout.seq_lens.max()) + self.num_lookahead_tokens, bs), table.shape[1])
        return slots, self.block_table.gather(rows, width)


@dataclass
class PackLayout:
    """Where each sequence of a step sits in the flat batch, computed for all of them at once."""

    lens: np.ndarray  # [B] int64: tokens each sequence runs this step
    query_start_loc: np.ndarray  # [B + 1] int64: where each sequence's tokens start in the batch
    seq_lens: np.ndarray  # [B] int64: context length of each sequence after the step
    positions: np.ndarray  # [T] int64: position of every token in its sequence


def _pack_layout(starts: np.ndarray, lens: np.ndarray) -> PackLayout:
    """`starts` [B]: tokens computed before the step, `lens` [B]: tokens run in it."""
    query_start_loc = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=query_start_loc[1:])
    # A token's position is its batch row shifted by where its sequence starts in the batch and in its context.
    positions = np.arange(query_start_loc[-1], dtype=np.int64) + np.repeat(starts - query_start_loc[:-1], lens)
    return PackLayout(lens, query_start_loc, starts + lens, positions)

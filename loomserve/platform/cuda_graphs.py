"""CUDA graphs for the model's forward: decode graphs per batch size, mixed graphs per token count.

A decode step of B requests replays the decode graph of the smallest captured size >= B, which yields the
logits of its B rows. Any other step of at most `max_capture_tokens` tokens (prefill chunks beside decodes,
prefill alone) replays the mixed graph of the smallest token count >= its T, which yields hidden states;
the logits of the rows that sample follow eagerly. Inputs are copied into static buffers; padding tokens
write no KV (slot -1) and belong to no sequence, since the attention kernels read the step's true sequence
counts from the device and size their grids by the capture's bounds. Steps with extra model inputs
(media embeddings, token types), pooling steps and larger steps run eagerly.

Each graph is captured with its own `ForwardBatch` over the static buffers, to which the features add their parts
(`RunnerHook.for_graph`): with LoRA (Triton kernels) a LoRA batch computed on the device, inside the graph, from the
slots buffer the LoRA manager refills every step, so a replay groups that step's tokens by adapter.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from loomserve.platform.attention import AttentionMetadata
from loomserve.platform.attention.metadata import LaunchBounds
from loomserve.platform.forward_batch import ForwardBatch

if TYPE_CHECKING:
    from loomserve.platform.config import EngineConfig

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Decode batch sizes: 1, 2, 4, 8, then every 8 up to max_num_seqs (at most 512)."""
    top = min(max_num_seqs, 512)
    sizes = [s for s in (1, 2, 4) if s < top] + list(range(8, top + 1, 8))
    return sorted(set(sizes + [top]))


def mixed_capture_sizes(max_tokens: int) -> list[int]:
    """Mixed-step token counts: every 32 up to 256, then every 128 up to max_tokens (padding stays under 1/3)."""
    sizes = [s for s in range(32, 257, 32) if s <= max_tokens]
    sizes += list(range(384, max_tokens + 1, 128))
    return sorted(set(sizes + ([max_tokens] if max_tokens else [])))


def max_graph_tokens(config: EngineConfig) -> int:
    """The most tokens a CUDA-graph step may hold (what graph-side buffers, such as LoRA's slots, are sized by)."""
    return max(config.scheduler_config.max_num_seqs, config.max_cudagraph_capture_size)


def graph_output_bytes(max_num_seqs: int, max_capture_tokens: int, vocab_size: int, hidden_size: int,
                       itemsize: int) -> int:
    """What the captured graphs keep for good beyond the KV cache: each decode graph's float32 logits
    [bs, vocab] and each mixed graph's hidden states [T, hidden] (everything else shares one pool, no larger
    than the memory profile's largest step)."""
    logits = sum(capture_sizes(max_num_seqs)) * vocab_size * 4
    return logits + sum(mixed_capture_sizes(max_capture_tokens)) * hidden_size * itemsize


class CudaGraphRunner:
    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], max_num_seqs: int,
                 max_model_len: int, block_size: int, max_capture_tokens: int,
                 for_graph: Callable[[ForwardBatch], None] | None = None) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.for_graph = for_graph  # adds the features' parts (a LoRA batch) to a graph's ForwardBatch
        self.max_model_len = max_model_len
        self.sizes = capture_sizes(max_num_seqs)
        self.token_sizes = mixed_capture_sizes(max_capture_tokens)
        n_seqs = self.sizes[-1]
        n_tokens, device = max([n_seqs, *self.token_sizes]), kv_caches[0].device
        self.input_ids = torch.zeros(n_tokens, dtype=torch.long, device=device)
        # M-RoPE models (Qwen2-VL) take three position rows per token.
        mrope = model.uses_mrope
        self.positions = torch.zeros((3, n_tokens) if mrope else n_tokens, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n_tokens,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(n_seqs, dtype=torch.long, device=device)
        self.query_start_loc = torch.zeros(n_seqs + 1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(n_seqs, -(-max_model_len // block_size), dtype=torch.long, device=device)
        self.seq_counts = torch.zeros(2, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # decode size -> [bs, vocab] float32
        self.mixed_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.hidden: dict[int, torch.Tensor] = {}  # token count -> [T, hidden]
        self._capture_all()

    def _meta(self, num_tokens: int, num_seqs: int, bounds: LaunchBounds) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:num_tokens],
            query_start_loc=self.query_start_loc[: num_seqs + 1],
            seq_lens=self.seq_lens[:num_seqs],
            block_tables=self.block_tables[:num_seqs],
            seq_counts=self.seq_counts,
            num_decodes=bounds.decodes,
            num_decode_tokens=bounds.decodes,
            query_start_loc_cpu=list(range(num_seqs + 1)),
            seq_lens_cpu=[1] * num_seqs,
            capture_bounds=bounds,
        )

    def _hidden(self, num_tokens: int, meta: AttentionMetadata) -> torch.Tensor:
        """The forward over the static buffers; run inside the capture, so what the features add here (a LoRA batch
        computed on the device) is made anew on each replay."""
        batch = ForwardBatch(meta, self.positions[..., :num_tokens])
        if self.for_graph is not None:
            self.for_graph(batch)
        return self.model(self.input_ids[:num_tokens], self.kv_caches, batch)

    def _decode_forward(self, bs: int) -> torch.Tensor:
        bounds = LaunchBounds(decodes=bs, prefills=0, prefill_tokens=0, max_seq_len=self.max_model_len)
        return self.model.compute_logits(self._hidden(bs, self._meta(bs, bs, bounds)))  # [bs, vocab] float32

    def _mixed_forward(self, num_tokens: int) -> torch.Tensor:
        num_seqs = self._seqs_for(num_tokens)
        bounds = LaunchBounds(decodes=num_seqs, prefills=num_seqs, prefill_tokens=num_tokens,
                              max_seq_len=self.max_model_len)
        return self._hidden(num_tokens, self._meta(num_tokens, num_seqs, bounds))  # [T, hidden]

    def _seqs_for(self, num_tokens: int) -> int:
        return min(num_tokens, self.sizes[-1])

    @torch.inference_mode()
    def _capture_all(self) -> None:
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        # Largest first, so smaller graphs reuse its memory. No sequence is live during capture (seq_counts is zero).
        for num_tokens in reversed(self.token_sizes):
            self.mixed_graphs[num_tokens], self.hidden[num_tokens] = _capture(self._mixed_forward, num_tokens, pool)
        for bs in reversed(self.sizes):
            self.graphs[bs], self.logits[bs] = _capture(self._decode_forward, bs, pool)
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for %d decode batch sizes (up to %d) and %d mixed token counts (up to %d) "
                    "in %.1f s", len(self.sizes), self.sizes[-1], len(self.token_sizes),
                    max(self.token_sizes, default=0), time.perf_counter() - start)

    def can_run_decode(self, num_seqs: int) -> bool:
        return num_seqs <= self.sizes[-1]

    def can_run_mixed(self, num_tokens: int, num_seqs: int) -> bool:
        return bool(self.token_sizes) and num_tokens <= self.token_sizes[-1] and num_seqs <= self.sizes[-1]

    def _load(self, input_ids: torch.Tensor, batch: ForwardBatch, padded: int) -> None:
        """Copy a step's inputs into the static buffers; tokens up to `padded` write no KV. The step's LoRA batch
        is not copied: the graph recomputes its own from the slots the LoRA manager wrote."""
        meta = batch.attn
        t, b = input_ids.shape[0], meta.num_seqs
        self.input_ids[:t].copy_(input_ids)
        self.positions[..., :t].copy_(batch.positions)
        self.slot_mapping[:t].copy_(meta.slot_mapping)
        self.slot_mapping[t:padded].fill_(-1)
        self.query_start_loc[: b + 1].copy_(meta.query_start_loc)
        self.seq_lens[:b].copy_(meta.seq_lens)
        self.block_tables[:b, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        self.seq_counts.copy_(meta.seq_counts)

    def run_decode(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Logits [B, vocab] for a decode-only batch of B sequences."""
        b = input_ids.shape[0]
        bs = next(s for s in self.sizes if s >= b)
        self._load(input_ids, batch, bs)
        self.graphs[bs].replay()
        return self.logits[bs][:b]

    def run_mixed(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Hidden states [T, hidden] of any batch of T tokens within the mixed graphs' sizes."""
        t = input_ids.shape[0]
        padded = next(s for s in self.token_sizes if s >= t)
        self._load(input_ids, batch, padded)
        self.mixed_graphs[padded].replay()
        return self.hidden[padded][:t]


def _capture(forward: Callable[[int], torch.Tensor], size: int, pool: tuple) -> tuple[torch.CUDAGraph, torch.Tensor]:
    """`forward(size)` run once (Triton compiles, the allocator settles), then captured: the graph and its output."""
    forward(size)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = forward(size)
    return graph, out

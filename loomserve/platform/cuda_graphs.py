"""CUDA graphs for decode-only steps: the model's forward and logits captured once per batch size.

A decode step of B requests replays the graph of the smallest captured size >= B. Inputs are copied
into static buffers; padding rows write no KV (slot -1) and attend to nothing (context 0), and their
logits are dropped. Prefill steps, and batches larger than the biggest graph, run eagerly.
"""

from __future__ import annotations

import logging
import time

import torch

from loomserve.platform.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to max_num_seqs (at most 512)."""
    top = min(max_num_seqs, 512)
    sizes = [s for s in (1, 2, 4) if s < top] + list(range(8, top + 1, 8))
    return sorted(set(sizes + [top]))


class CudaGraphRunner:
    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], max_num_seqs: int,
                 max_blocks_per_seq: int) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = capture_sizes(max_num_seqs)
        n, device = self.sizes[-1], kv_caches[0].device
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        # M-RoPE models (Qwen2-VL) take three position rows per token.
        mrope = getattr(model, "uses_mrope", False)
        self.positions = torch.zeros((3, n) if mrope else n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.long, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._capture_all()

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            num_decodes=bs,
            num_decode_tokens=bs,
            query_start_loc_cpu=list(range(bs + 1)),
            seq_lens_cpu=[1] * bs,
        )

    def _forward(self, bs: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:bs], self.positions[..., :bs], self.kv_caches, self._meta(bs))
        return self.model.compute_logits(hidden)  # [bs, vocab] float32

    @torch.inference_mode()
    def _capture_all(self) -> None:
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            self._forward(bs)  # warm up: Triton compiles, allocator settles
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[bs] = self._forward(bs)
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for %d decode batch sizes (up to %d) in %.1f s",
                    len(self.sizes), self.sizes[-1], time.perf_counter() - start)

    def can_run(self, num_seqs: int) -> bool:
        return num_seqs <= self.sizes[-1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Logits [B, vocab] for a decode-only batch of B sequences."""
        b = input_ids.shape[0]
        bs = next(s for s in self.sizes if s >= b)
        self.input_ids[:b].copy_(input_ids)
        self.positions[..., :b].copy_(positions)
        self.slot_mapping[:b].copy_(meta.slot_mapping)
        self.slot_mapping[b:bs].fill_(-1)
        self.seq_lens[:b].copy_(meta.seq_lens)
        self.seq_lens[b:bs].zero_()
        width = meta.block_tables.shape[1]
        self.block_tables[:b, :width].copy_(meta.block_tables)
        self.graphs[bs].replay()
        return self.logits[bs][:b]

"""The runner's multimodal step: run the encoders the scheduler asked for, keep their outputs by content hash,
and build the decoder's inputs for the flat batch: token embeddings with each media embedding scattered
into its placeholder positions (a chunk may hold only part of an item), and M-RoPE positions [3, T] for
models that use them."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np
import torch

from loomserve.modalities.encoder_cache import EncoderCache
from loomserve.platform.models.mrope import chunk_positions
from loomserve.platform.scheduler import ScheduledRequest, SchedulerOutput

if TYPE_CHECKING:
    from loomserve.platform.runner import BatchInputs


class MultiModalRunner:
    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.cache = EncoderCache()

    def prepare(self, out: SchedulerOutput, scheduled: list[ScheduledRequest], batch: BatchInputs) -> None:
        """Encode this step's items, set the forward's `positions` for M-RoPE models, and, when the batch holds media
        tokens, its input embeddings [T, hidden] as `inputs_embeds` (else the model embeds the token ids itself)."""
        self._encode(out)
        if self.model.uses_mrope:
            batch.forward.positions = self._mrope_positions(scheduled)
        rows, embeds = [], []
        offset = 0
        for s in scheduled:
            start, end = s.start, s.start + s.num_new_tokens
            for item in s.request.mm_items:
                p = item.placeholder
                lo, hi = max(start, p.offset), min(end, p.end)
                if lo < hi:
                    embeds.append(self.cache[item.content_hash][lo - p.offset : hi - p.offset])
                    rows.append(torch.arange(offset + lo - start, offset + hi - start))
            offset += s.num_new_tokens
        if not embeds:
            return
        inputs_embeds = self.model.embed_input_ids(batch.input_ids)  # [T, hidden]
        index = torch.cat(rows).to(self.device, non_blocking=True)  # a blocking copy would wait for the step in flight
        inputs_embeds.index_copy_(0, index, torch.cat(embeds).to(inputs_embeds.dtype))
        batch.forward.inputs_embeds = inputs_embeds

    def _encode(self, out: SchedulerOutput) -> None:
        by_modality = defaultdict(list)
        for item in out.encoder_inputs:
            by_modality[item.modality].append(item)
        hashes, outputs = [], []
        for modality, items in by_modality.items():
            encoded = self.model.encode(modality, items)
            for item, tensor in zip(items, encoded, strict=True):
                if tensor.shape[0] != item.placeholder.length:
                    raise RuntimeError(f"the {modality} encoder gave {tensor.shape[0]} embeddings for "
                                       f"{item.placeholder.length} placeholder tokens")
                hashes.append(item.content_hash)
                outputs.append(tensor)
        self.cache.update(out.freed_encoder_hashes, hashes, outputs)

    def _mrope_positions(self, scheduled: list[ScheduledRequest]) -> torch.Tensor:
        chunks = []
        decodes: list[int] = []  # a run of decode tokens: past their prompts, one position in all three rows
        for s in scheduled:
            request = s.request
            if request.mm_positions is None:
                request.mm_positions = self.model.mrope_positions(request.num_prompt_tokens, request.mm_items)
            if s.num_new_tokens == 1 and s.start >= request.num_prompt_tokens:  # the hot path: a scalar
                decodes.append(s.start + request.mm_positions.delta)
                continue
            _flush_decodes(chunks, decodes)
            chunks.append(chunk_positions(request.mm_positions, s.start, s.start + s.num_new_tokens))
        _flush_decodes(chunks, decodes)
        # [3, T]; on every step of an M-RoPE model, so never a blocking copy (it would wait for the step in flight)
        return torch.from_numpy(np.concatenate(chunks, axis=1)).to(self.device, non_blocking=True)


def _flush_decodes(chunks: list[np.ndarray], decodes: list[int]) -> None:
    """Append the pending decode positions to `chunks` as [3, n] and clear them."""
    if decodes:
        chunks.append(np.broadcast_to(np.array(decodes, dtype=np.int64), (3, len(decodes))))
        decodes.clear()

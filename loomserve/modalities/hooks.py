"""The multimodal feature's hooks: the encoder cache and budget beside the scheduler (`EncoderCacheManager`), and in
the runner the encoders themselves. The runner hook runs the encoders the scheduler asked for, keeps their outputs
by content hash, and builds the decoder's inputs for the flat batch: token embeddings with each media embedding
scattered into its placeholder positions (`placeholder_embeds.py`), and M-RoPE positions [3, T] for
models that use them."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from loomserve.modalities.encoder_cache import EncoderCache, EncoderCacheManager
from loomserve.modalities.inputs import MultiModalItem
from loomserve.modalities.media_embeds import encode_items
from loomserve.modalities.pixels import with_pixel_values
from loomserve.modalities.placeholder_embeds import with_placeholder_embeds
from loomserve.platform.features import RunnerHook
from loomserve.platform.models.mrope import chunk_positions
from loomserve.platform.models.registry import is_multimodal

if TYPE_CHECKING:
    from loomserve.platform.config import EngineConfig
    from loomserve.platform.input_batch import BatchInputs
    from loomserve.platform.step import ScheduledStep


def scheduler_hook(config: EngineConfig) -> EncoderCacheManager | None:
    if not is_multimodal(config.model_config.architecture):
        return None
    return EncoderCacheManager.for_engine(config)


def runner_hook(config: EngineConfig, model: nn.Module, device: torch.device) -> MultiModalRunnerHook | None:
    if not model.is_multimodal:
        return None
    return MultiModalRunnerHook(model, device)


class MultiModalRunnerHook(RunnerHook):
    name = "mm"

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.cache = EncoderCache()

    def prepare(self, step: ScheduledStep, batch: BatchInputs) -> None:
        """Encode this step's items, set the positions for M-RoPE models, and, when the batch holds media tokens, the
        input embeddings [T, hidden] (else the model embeds the token ids itself)."""
        data = step.features.get(self.name)
        if data is not None:
            self._encode(data["encode"], data["free"], batch)
        if self.model.uses_mrope:
            batch.forward.positions = self._mrope_positions(batch)
        placed = with_placeholder_embeds(batch, self.model.embed_input_ids, lambda item: self.cache[item.content_hash])
        if placed is not None:
            batch.forward.inputs_embeds, batch.forward.media_rows = placed

    def _encode(self, hashes: list[str], freed: list[str], batch: BatchInputs) -> None:
        """Run the encoders over the items named by content hash (each belongs to a request of the step)."""
        wanted = set(hashes)
        items: dict[str, MultiModalItem] = {}
        for state in batch.requests:
            for item in state.mm_items:
                if item.content_hash in wanted:
                    items.setdefault(item.content_hash, item)
        by_modality = defaultdict(list)
        for h in hashes:
            by_modality[items[h].modality].append(items[h])
        done, outputs = [], []
        for modality, group in by_modality.items():
            encoded = encode_items(self.model, modality, [with_pixel_values(item, self.device) for item in group])
            for item, tensor in zip(group, encoded, strict=True):
                if tensor.shape[0] != item.placeholder.length:
                    raise RuntimeError(f"the {modality} encoder gave {tensor.shape[0]} embeddings for "
                                       f"{item.placeholder.length} placeholder tokens")
                done.append(item.content_hash)
                outputs.append(tensor)
        self.cache.update(freed, done, outputs)

    def _mrope_positions(self, batch: BatchInputs) -> torch.Tensor:
        chunks = []
        decodes: list[int] = []  # a run of decode tokens: past their prompts, one position in all three rows
        for s, state in zip(batch.scheduled, batch.requests):
            if state.mm_positions is None:
                state.mm_positions = self.model.mrope_positions(state.num_prompt_tokens, state.mm_items)
            if s.num_new_tokens == 1 and s.start >= state.num_prompt_tokens:  # the hot path: a scalar
                decodes.append(s.start + state.mm_positions.delta)
                continue
            _flush_decodes(chunks, decodes)
            chunks.append(chunk_positions(state.mm_positions, s.start, s.start + s.num_new_tokens))
        _flush_decodes(chunks, decodes)
        # [3, T]; on every step of an M-RoPE model, so never a blocking copy (it would wait for the step in flight)
        return torch.from_numpy(np.concatenate(chunks, axis=1)).to(self.device, non_blocking=True)


def _flush_decodes(chunks: list[np.ndarray], decodes: list[int]) -> None:
    """Append the pending decode positions to `chunks` as [3, n] and clear them."""
    if decodes:
        chunks.append(np.broadcast_to(np.array(decodes, dtype=np.int64), (3, len(decodes))))
        decodes.clear()

"""The cross-attention store of encoder-decoder models (Whisper): each request's encoder output, turned into every
decoder layer's cross-attention keys and values, computed once when the request first runs and kept until it
finishes or is preempted (then computed again when it resumes: its media item stays with the runner).

As in vLLM, where the cross-attention KV of a request is allocated once for the encoder's length and freed with the
request, the store holds one dense [layers, 2, S, heads, head_dim] tensor per running request. The scheduler's side
admits a request only while the store has room for it, within the encoder memory budget (`encoder_cache_memory`,
which an encoder-decoder model spends here instead of on cached media embeddings).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from loomserve.platform.attention.cross import CrossAttentionBatch
from loomserve.platform.features import RunnerHook, SchedulerHook

if TYPE_CHECKING:
    from loomserve.modalities.inputs import MultiModalItem
    from loomserve.platform.config import EngineConfig
    from loomserve.platform.forward_batch import ForwardBatch
    from loomserve.platform.input_batch import BatchInputs, RequestState
    from loomserve.platform.request import Request
    from loomserve.platform.step import ScheduledStep


def cross_kv_bytes(config: EngineConfig) -> int:
    """Bytes of one request's cross-attention keys and values: 2 x layers x encoder positions x hidden size."""
    mc = config.model_config
    hf = mc.hf_config
    return 2 * mc.num_layers * hf.max_source_positions * hf.d_model * mc.dtype.itemsize


def scheduler_hook(config: EngineConfig) -> CrossKVAdmission | None:
    from loomserve.platform.models.registry import is_encoder_decoder

    if not is_encoder_decoder(config.model_config.architecture):
        return None
    return CrossKVAdmission(max(1, config.mm_config.encoder_cache_memory // cross_kv_bytes(config)))


def runner_hook(config: EngineConfig, model: nn.Module, device: torch.device) -> CrossKVStore | None:
    return CrossKVStore(model) if model.is_encoder_decoder else None


class CrossKVAdmission(SchedulerHook):
    """Admits a request while fewer than `capacity` requests hold cross-attention keys and values."""

    name = "cross_attn"

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.holders: set[str] = set()

    def admits(self, request: Request) -> bool:
        return request.request_id in self.holders or len(self.holders) < self.capacity

    def commit(self, request: Request, start: int, num_tokens: int) -> None:
        self.holders.add(request.request_id)

    def release(self, request: Request) -> None:
        self.holders.discard(request.request_id)


class CrossKVStore(RunnerHook):
    """The runner's side: request id -> its cross-attention keys and values [layers, 2, S, H, D]."""

    name = "cross_attn"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.entries: dict[str, torch.Tensor] = {}

    def begin_step(self, step: ScheduledStep) -> None:
        for request_id in step.preempted_ids:  # its blocks are gone; it starts over when it resumes
            self.entries.pop(request_id, None)

    def release(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.entries.pop(request_id, None)

    def prepare(self, step: ScheduledStep, batch: BatchInputs) -> None:
        """Encode the requests the store does not hold yet, then hand the step its requests' keys and values."""
        new = [state for state in batch.requests if state.request_id not in self.entries]
        if new:
            items = [self._audio_of(state) for state in new]
            for state, encoded in zip(new, self.model.encode("audio", items), strict=True):
                self.entries[state.request_id] = self.model.cross_kv(encoded)
        batch.forward.cross_attn = CrossAttentionBatch(
            batch.forward.attn.query_start_loc_cpu, [self.entries[state.request_id] for state in batch.requests])

    def for_profile(self, batch: ForwardBatch) -> None:
        """Keys and values of one full-length encoder output per sequence of the profile."""
        layers = self.model.model.decoder.layers
        attn = layers[0].encoder_attn
        shape = (len(layers), 2, self.model.config.max_source_positions, attn.num_heads, attn.head_dim)
        weight = attn.q_proj.weight
        kv = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        batch.cross_attn = CrossAttentionBatch(batch.attn.query_start_loc_cpu, [kv] * batch.attn.num_seqs)

    @staticmethod
    def _audio_of(state: RequestState) -> MultiModalItem:
        items = state.mm_items
        if len(items) != 1 or items[0].modality != "audio":
            raise RuntimeError(f"request {state.request_id}: an encoder-decoder request carries one audio clip, "
                               f"got {len(items)} media items")
        return items[0]

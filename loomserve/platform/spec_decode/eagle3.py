"""The EAGLE-3 proposer: a one-layer head drafts from the target's own hidden states.

Every step the target copies the inputs of three of its layers into the head's buffer (`aux_hidden.py`, through the
step's ForwardBatch, CUDA graphs included). Once the step has sampled, still on the device, the head runs over the
step's positions: at position i it reads fc(the target's states at i) and the embedding of the token at i + 1 (the
next token in the batch, the prompt's next token after a chunk that stops short, the sampled token after a
sampling row). That writes its KV at those positions (garbage past a rejected draft, rewritten when the target
runs them) and leaves, at each sampling row, the output the first draft comes from. When the step lands, each
request's first draft comes from the row of its last accepted position; each next draft from the head decoding the
draft before it with its own previous (pre-norm) output as the hidden state.

A prefix-cache hit reuses the head's KV as it reuses the target's: at the last cached position it was computed
with the token that followed there in the request that filled the block, which only a prompt that diverges right
at a block boundary sees differently (its drafts may be worse, never its output).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from loomserve.platform.cuda_graphs import max_graph_tokens
from loomserve.platform.forward_batch import ForwardBatch
from loomserve.platform.loader import (
    check_all_loaded,
    default_dtype,
    init_dummy_weights,
    iterate_safetensors,
    safetensors_files,
)
from loomserve.platform.models.llama_eagle3 import Eagle3Head
from loomserve.platform.spec_decode.aux_hidden import AuxHiddenStates
from loomserve.platform.spec_decode.eagle3_config import aux_layer_ids, head_config, target_hidden_size
from loomserve.platform.spec_decode.model_proposer import ModelProposer

if TYPE_CHECKING:
    from torch import nn

    from loomserve.platform.config import EngineConfig, SpeculativeConfig
    from loomserve.platform.input_batch import BatchInputs, RequestState
    from loomserve.platform.spec_decode.proposer import LandedStep


@dataclass
class HeadStart:
    """What the head computed at a step's sampling rows, kept until the step lands."""

    normed: torch.Tensor  # [N, hidden] the head's output at each sampling row (its logits' input)
    prenorm: torch.Tensor  # [N, hidden] the same before the final norm (the next draft step's hidden state)
    first_row: dict[str, int]  # request id -> its first sampling row


def head_weights(path: str) -> dict[str, torch.Tensor]:
    """The head's tensors: safetensors, or the EAGLE repo's `pytorch_model.bin`."""
    folder = Path(path)
    if folder.is_dir() and not any(folder.glob("*.safetensors")) and (folder / "pytorch_model.bin").exists():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    return dict(iterate_safetensors(safetensors_files(path)))


def load_head(spec: SpeculativeConfig, hf_config: Any, config: EngineConfig, device: torch.device) -> Eagle3Head:
    """The head of config `hf_config`, its weights from the checkpoint (random when the target's are dummy)."""
    mc = config.model_config
    weights = {} if mc.load_format == "dummy" else head_weights(spec.model)
    own_embeddings = any(name.removeprefix("model.") == "embed_tokens.weight" for name in weights)
    if not own_embeddings and hf_config.hidden_size != mc.text_config.hidden_size:
        raise ValueError(f"the EAGLE-3 head {spec.model} has hidden size {hf_config.hidden_size} but no embeddings "
                         f"of its own, and the target's have {mc.text_config.hidden_size} dimensions")
    max_positions = max(mc.max_model_len, hf_config.max_position_embeddings) + spec.num_speculative_tokens
    aux_size = 3 * target_hidden_size(hf_config)
    with default_dtype(mc.dtype), device:
        head = Eagle3Head(hf_config, aux_size, max_positions, own_embeddings, config.attention_backend)
    if mc.load_format == "dummy":
        init_dummy_weights(head, mc.seed, hf_config)
    else:
        check_all_loaded(head, head.load_weights(weights.items()))
    return head.eval()


class Eagle3Proposer(ModelProposer):
    def __init__(self, spec: SpeculativeConfig, config: EngineConfig, target: nn.Module,
                 device: torch.device) -> None:
        mc = config.model_config
        hf_config = head_config(spec.model)
        self.head = load_head(spec, hf_config, config, device)
        self.embed = target.embed_input_ids if self.head.embed_tokens is None else self.head.embed_tokens
        layers = aux_layer_ids(hf_config, mc.text_config.num_hidden_layers)
        max_tokens = max(config.scheduler_config.max_num_batched_tokens, max_graph_tokens(config))
        buffer = torch.zeros(max_tokens, len(layers) * mc.text_config.hidden_size, dtype=mc.dtype, device=device)
        self.aux = AuxHiddenStates(layers, buffer)
        attn = self.head.midlayer.self_attn
        super().__init__(1, attn.num_kv_heads, attn.head_dim, mc.dtype, mc.vocab_size, config.cache_config.block_size,
                         device)
        self._hidden: torch.Tensor | None = None  # while drafting: the head's last pre-norm output [R, hidden]

    def prepare(self, batch: BatchInputs) -> None:
        batch.forward.aux_hidden = self.aux
        super().prepare(batch)

    def for_graph(self, batch: ForwardBatch) -> None:
        batch.aux_hidden = self.aux

    @torch.inference_mode()
    def follow(self, batch: BatchInputs, sampled: torch.Tensor) -> HeadStart | None:
        """Run the head over the step's positions (its KV, and the first drafts' outputs at the sampling rows)."""
        num_tokens = batch.input_ids.shape[0]
        hidden = self.head.combine(self.aux.out[:num_tokens])  # [T, hidden]
        embeds = self.embed(self._next_token_ids(batch, sampled))  # [T, hidden]
        forward = ForwardBatch(batch.forward.attn, batch.forward.positions)
        normed, prenorm = self.head(embeds, hidden, self.kv_caches[0], forward)
        if not batch.sample_requests:
            return None
        rows = batch.logits_indices
        first_rows = np.cumsum([0] + [1 + len(d) for d in batch.drafts]).tolist()
        return HeadStart(normed[rows], prenorm[rows],
                         {s.request_id: row for s, row in zip(batch.sample_requests, first_rows)})

    def _next_token_ids(self, batch: BatchInputs, sampled: torch.Tensor) -> torch.Tensor:
        """[T] the token one past each of the step's positions: the next one in the batch, the prompt's after a chunk
        that stops short, the sampled one after each sampling row."""
        ids = batch.input_ids
        next_ids = torch.cat([ids[1:], ids[:1]])  # [T]; each request's last token gets its own below
        at, known = [], []
        end = 0
        for scheduled, state in zip(batch.scheduled, batch.requests):
            end += scheduled.num_new_tokens
            after = scheduled.start + scheduled.num_new_tokens
            if not scheduled.samples and after < state.num_tokens:
                at.append(end - 1)
                known.append(state.token_at(after))
        if at:
            next_ids[torch.tensor(at, device=ids.device)] = torch.tensor(known, device=ids.device)
        if sampled.numel():
            next_ids[batch.logits_indices] = sampled
        return next_ids

    def _first_logits(self, rows: list[RequestState], landed: LandedStep) -> torch.Tensor:
        """From the row of each request's last accepted position (its first row + accepted drafts)."""
        start: HeadStart = landed.followed
        index = [start.first_row[s.request_id] + len(landed.sampled[s.request_id]) - 1 for s in rows]
        index_t = torch.tensor(index, device=self.device)
        self._hidden = start.prenorm[index_t]  # [R, hidden]
        self._start_drafting(rows)
        return self.head.compute_logits(start.normed[index_t])

    def _next_logits(self, tokens: torch.Tensor, j: int) -> torch.Tensor:
        """The head at each request's last position + j - 1, reading draft j - 1 `tokens` [R] and its own output
        there."""
        positions = torch.tensor([p + j - 1 for p in self._last], device=self.device)  # [R]
        attn = self._decode_attention(positions, self._rows_tables, [p + j for p in self._last])
        normed, self._hidden = self.head(self.embed(tokens), self._hidden, self.kv_caches[0],
                                         ForwardBatch(attn, positions))
        return self.head.compute_logits(normed)

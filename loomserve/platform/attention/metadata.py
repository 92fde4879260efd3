"""What an attention backend receives about a step's flat batch: where each sequence's tokens are."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class LaunchBounds:
    """How much work a step can hold, on the host: what the Triton kernels size their grids and split
    buffers by. Exact in an eager step; inside a CUDA graph, the most that any step replaying it can hold."""

    decodes: int
    prefills: int
    prefill_tokens: int
    max_seq_len: int


@dataclass
class AttentionMetadata:
    """A step of B sequences, T tokens, decodes first (query length 1), then prefill chunks.

    Inside a CUDA graph B and T are the capture's padded sizes: padding tokens have slot -1 and belong to no
    sequence, and the kernels read the step's true counts from `seq_counts` on the device."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) of each new token
    query_start_loc: torch.Tensor  # [B + 1] int32 or int64: where each sequence's new tokens start in the batch
    seq_lens: torch.Tensor  # [B] int32 or int64: context length of each sequence after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32 or int64: KV block ids of each sequence, padded with 0
    seq_counts: torch.Tensor  # [2] int32 or int64 on the device: (decodes, sequences) this step
    num_decodes: int  # the first num_decodes sequences have exactly one new token
    num_decode_tokens: int
    query_start_loc_cpu: list[int]  # host copies, so the reference backend never syncs the device
    seq_lens_cpu: list[int]
    capture_bounds: LaunchBounds | None = None  # set while a CUDA graph is captured
    calculate_kv_scales: bool = False  # each layer takes its KV scales from this step's keys and values first
    derived: dict[Any, Any] = field(default_factory=dict)  # what a backend derives once per step, for every layer

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    def launch_bounds(self) -> LaunchBounds:
        if self.capture_bounds is not None:
            return self.capture_bounds
        qsl = self.query_start_loc_cpu
        return LaunchBounds(
            decodes=self.num_decodes,
            prefills=self.num_seqs - self.num_decodes,
            prefill_tokens=qsl[-1] - qsl[self.num_decodes],
            max_seq_len=max(self.seq_lens_cpu, default=0),
        )

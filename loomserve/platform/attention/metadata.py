"""What an attention backend receives about a step's flat batch: where each sequence's tokens are."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """A step of B sequences, T tokens, decodes first (query length 1), then prefill chunks."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) of each new token
    query_start_loc: torch.Tensor  # [B + 1] int32 or int64: where each sequence's new tokens start in the batch
    seq_lens: torch.Tensor  # [B] int32 or int64: context length of each sequence after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32 or int64: KV block ids of each sequence, padded with 0
    num_decodes: int  # the first num_decodes sequences have exactly one new token
    num_decode_tokens: int
    query_start_loc_cpu: list[int]  # host copies, so the reference backend never syncs the device
    seq_lens_cpu: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

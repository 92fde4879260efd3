"""Test helper: pack sequences into one step's flat batch and run a model through a paged KV cache whose
blocks are handed out in shuffled order (so no sequence's blocks are contiguous)."""

from __future__ import annotations

from pathlib import Path

import torch

from loomserve.platform.attention import AttentionMetadata
from loomserve.platform.config import EngineArgs, ModelConfig
from loomserve.platform.distributed.parallel_state import get_tp_group, kv_heads_per_rank
from loomserve.platform.forward_batch import ForwardBatch
from loomserve.platform.loader import load_model
from loomserve.platform.models.decoder import head_dim_of


def model_config(path: Path, **engine_args) -> ModelConfig:
    """The engine's ModelConfig for a checkpoint folder, fp32 on CPU unless told otherwise."""
    engine_args = {"device": "cpu", "dtype": "float32", **engine_args}
    return EngineArgs(model=str(path), **engine_args).create_engine_config().model_config


def load(path: Path, **engine_args) -> torch.nn.Module:
    return load_model(model_config(path, **engine_args))


def make_metadata(
    query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]], block_size: int
) -> AttentionMetadata:
    """Metadata for sequences whose last `query_lens[i]` of `seq_lens[i]` tokens are new this step.
    Leading sequences with one new token count as decodes."""
    num_decodes = next((i for i, n in enumerate(query_lens) if n != 1), len(query_lens))
    slots = [
        table[pos // block_size] * block_size + pos % block_size
        for n, length, table in zip(query_lens, seq_lens, block_tables, strict=True)
        for pos in range(length - n, length)
    ]
    width = max(len(table) for table in block_tables)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32),
        seq_counts=torch.tensor([num_decodes, len(query_lens)]),
        num_decodes=num_decodes,
        num_decode_tokens=num_decodes,
        query_start_loc_cpu=starts,
        seq_lens_cpu=list(seq_lens),
    )


class PagedRunner:
    """Feeds chunks of many sequences to a model step by step, keeping their KV in a paged cache."""

    def __init__(self, model: torch.nn.Module, block_size: int, num_blocks: int = 64, seed: int = 0,
                 kv_dtype: torch.dtype | None = None) -> None:
        """`kv_dtype`: the cache's (default: the model's)."""
        config = model.config
        num_kv_heads = kv_heads_per_rank(config.num_key_value_heads, get_tp_group().size)  # this rank's
        shape = (2, num_blocks, block_size, num_kv_heads, head_dim_of(config))
        dtype = kv_dtype or next(model.parameters()).dtype
        self.kv_caches = [torch.zeros(shape, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.model = model
        self.block_size = block_size
        self.free_blocks = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.block_tables: dict[str, list[int]] = {}
        self.lengths: dict[str, int] = {}

    @torch.inference_mode()
    def step(self, chunks: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        """One step over {sequence: new token ids} (decodes first); returns each sequence's logits [n, V]."""
        query_lens, seq_lens, tables, positions = [], [], [], []
        for seq, tokens in chunks.items():
            start = self.lengths.get(seq, 0)
            self.lengths[seq] = start + len(tokens)
            table = self.block_tables.setdefault(seq, [])
            while len(table) * self.block_size < self.lengths[seq]:
                table.append(self.free_blocks.pop())
            query_lens.append(len(tokens))
            seq_lens.append(self.lengths[seq])
            tables.append(table)
            positions.extend(range(start, self.lengths[seq]))
        meta = make_metadata(query_lens, seq_lens, tables, self.block_size)
        input_ids = torch.tensor([t for tokens in chunks.values() for t in tokens], dtype=torch.int64)
        batch = ForwardBatch(meta, torch.tensor(positions, dtype=torch.int64))
        hidden = self.model(input_ids, self.kv_caches, batch)
        logits = self.model.compute_logits(hidden)  # [T, V]
        return dict(zip(chunks, logits.split(query_lens), strict=True))


PROMPT_LENS = (5, 12, 2)  # 19 tokens, then 3 decodes a step: the ranks' token shares (EP) are uneven
DECODE_STEPS = 4


def greedy_decode(model: torch.nn.Module) -> tuple[list[list[int]], torch.Tensor, int]:
    """Greedy continuations of seeded prompts through the paged cache, every step's logits [steps * ..., V], and
    how many parameters the process holds."""
    runner = PagedRunner(model, block_size=4)
    generator = torch.Generator().manual_seed(0)
    chunks = {f"s{i}": torch.randint(100, (n,), generator=generator).tolist() for i, n in enumerate(PROMPT_LENS)}
    tokens: dict[str, list[int]] = {seq: [] for seq in chunks}
    all_logits = []
    for _ in range(DECODE_STEPS):
        out = runner.step(chunks)
        all_logits += [out[seq][-1] for seq in chunks]
        chunks = {seq: [int(logits[-1].argmax())] for seq, logits in out.items()}
        for seq, (token,) in chunks.items():
            tokens[seq].append(token)
    return list(tokens.values()), torch.stack(all_logits), sum(p.numel() for p in model.parameters())

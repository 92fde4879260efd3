"""Packing a step into one flat batch: decodes first, every token's position and KV slot computed for the whole batch
at once, and, for a model that keeps no KV (an encoder), no slots and no block tables at all."""

from __future__ import annotations

import torch

from loomserve import PoolingParams, SamplingParams
from loomserve.platform.input_batch import BatchInputs, InputBatch
from loomserve.platform.step import NewRequest, ScheduledRequest, ScheduledStep

BLOCK = 4


def input_batch(uses_kv_cache: bool = True) -> InputBatch:
    return InputBatch(8, 64, BLOCK, torch.device("cpu"), uses_kv_cache=uses_kv_cache)


def prompt(request_id: str, n: int, pooling: bool = False) -> NewRequest:
    params = (None, PoolingParams(pooling_type="MEAN")) if pooling else (SamplingParams(max_tokens=4), None)
    return NewRequest(request_id, list(range(100, 100 + n)), params[0], pooling_params=params[1])


def pack(batch: InputBatch, step: ScheduledStep) -> BatchInputs:
    batch.apply(step)
    return batch.prepare(step)


def test_decodes_come_first_and_every_token_gets_its_position_and_slot():
    batch = input_batch()
    first = ScheduledStep([prompt("a", 5), prompt("b", 3)], [
        ScheduledRequest("a", 5, 0, [7, 2], samples=True),  # blocks 7 (positions 0-3) and 2 (4-7)
        ScheduledRequest("b", 3, 0, [5], samples=True),
    ])
    pack(batch, first)
    batch.land({"a": [9], "b": [8]})
    second = ScheduledStep([prompt("c", 6)], [
        ScheduledRequest("c", 4, 0, [1]),  # a chunk of c's prompt, listed before the decodes
        ScheduledRequest("a", 1, 5, [], samples=True),
        ScheduledRequest("b", 1, 3, [], samples=True),
    ])
    out = pack(batch, second)
    attn = out.forward.attn
    assert [s.request_id for s in out.scheduled] == ["a", "b", "c"] and attn.num_decodes == 2
    assert out.input_ids.tolist() == [9, 8, 100, 101, 102, 103]
    assert out.forward.positions.tolist() == [5, 3, 0, 1, 2, 3]
    assert attn.slot_mapping.tolist() == [2 * BLOCK + 1, 5 * BLOCK + 3, 4, 5, 6, 7]
    assert attn.query_start_loc_cpu == [0, 1, 2, 6] and attn.seq_lens_cpu == [6, 4, 4]
    assert attn.block_tables.tolist() == [[7, 2], [5, 0], [1, 0]]
    assert out.logits_indices.tolist() == [0, 1]


def test_an_encoder_step_has_no_slots_or_block_tables_and_the_same_layout():
    step = ScheduledStep([prompt("a", 5, pooling=True), prompt("b", 2, pooling=True)], [
        ScheduledRequest("a", 5, 0, [], pools=True),
        ScheduledRequest("b", 2, 0, [], pools=True),
    ])
    with_kv = pack(input_batch(), step)
    without = pack(input_batch(uses_kv_cache=False), step)
    assert without.forward.attn.slot_mapping.numel() == 0 and without.forward.attn.block_tables.shape == (2, 0)
    assert without.input_ids.tolist() == with_kv.input_ids.tolist() == [100, 101, 102, 103, 104, 100, 101]
    assert without.forward.positions.tolist() == with_kv.forward.positions.tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert without.forward.attn.query_start_loc_cpu == with_kv.forward.attn.query_start_loc_cpu == [0, 5, 7]

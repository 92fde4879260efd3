"""Encoder attention over a packed batch: each sequence attends to all of its own tokens and to nothing else,
whatever the mix of lengths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loomserve.platform.attention.encoder import EncoderAttention, SequenceLayout

LENGTHS = [1, 5, 5, 17, 3, 64, 60, 2, 16, 16, 16, 40]
H, D = 4, 8


def packed(lengths: list[int]) -> tuple[torch.Tensor, list[int]]:
    query_start_loc = [0]
    for n in lengths:
        query_start_loc.append(query_start_loc[-1] + n)
    return torch.randn(query_start_loc[-1], 3, H, D, generator=torch.Generator().manual_seed(0)), query_start_loc


def reference(qkv: torch.Tensor, query_start_loc: list[int]) -> torch.Tensor:
    """Each sequence on its own: [T, H * D]."""
    out = []
    for start, end in zip(query_start_loc, query_start_loc[1:]):
        q, k, v = qkv[start:end].permute(1, 2, 0, 3)  # [H, n, D] each
        out.append(F.scaled_dot_product_attention(q, k, v).transpose(0, 1).flatten(1))
    return torch.cat(out)


def test_packed_attention_equals_each_sequence_alone():
    qkv, query_start_loc = packed(LENGTHS)
    layout = SequenceLayout(query_start_loc, torch.device("cpu"), torch.float32)
    got = EncoderAttention(H, D, D**-0.5).forward(qkv, layout)
    assert torch.allclose(got, reference(qkv, query_start_loc), atol=1e-6)


def test_a_sequence_does_not_see_its_neighbours():
    qkv, query_start_loc = packed(LENGTHS)
    layout = SequenceLayout(query_start_loc, torch.device("cpu"), torch.float32)
    attention = EncoderAttention(H, D, D**-0.5)
    before = attention.forward(qkv, layout)
    start, end = query_start_loc[8], query_start_loc[9]  # change a 16-token sequence that shares its group
    qkv[start:end] += 1.0
    after = attention.forward(qkv, layout)
    assert torch.equal(torch.cat([before[:start], before[end:]]), torch.cat([after[:start], after[end:]]))
    assert not torch.allclose(before[start:end], after[start:end])


def test_sequences_of_equal_length_share_one_call():
    _, query_start_loc = packed(LENGTHS)
    groups = SequenceLayout(query_start_loc, torch.device("cpu"), torch.float32).groups
    assert sorted((g.L, g.b) for g in groups) == sorted((n, LENGTHS.count(n)) for n in set(LENGTHS))
    assert sorted(torch.cat([g.rows for g in groups]).tolist()) == list(range(query_start_loc[-1]))


def test_a_cpu_step_groups_by_length_instead_of_the_varlen_kernel():
    _, query_start_loc = packed(LENGTHS)
    assert not SequenceLayout(query_start_loc, torch.device("cpu"), torch.bfloat16).varlen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the varlen flash kernel runs on CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_one_varlen_call_equals_each_sequence_alone_on_cuda(dtype):
    qkv, query_start_loc = packed(LENGTHS)
    layout = SequenceLayout(query_start_loc, torch.device("cuda"), dtype)
    assert layout.varlen
    got = EncoderAttention(H, D, D**-0.5).forward(qkv.to("cuda", dtype), layout)
    assert torch.allclose(got.float().cpu(), reference(qkv, query_start_loc), atol=2e-2)

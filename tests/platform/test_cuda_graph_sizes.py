"""The sizes CUDA graphs are captured at: every step up to the largest finds one, with bounded padding."""

from __future__ import annotations

import pytest

from loomserve.platform.cuda_graphs import capture_sizes, mixed_capture_sizes


@pytest.mark.parametrize("max_tokens", [8, 100, 512, 1000])
def test_every_mixed_step_up_to_the_capture_size_has_a_graph_with_under_a_third_padding(max_tokens):
    sizes = mixed_capture_sizes(max_tokens)
    assert sizes[-1] == max_tokens
    for t in range(1, max_tokens + 1):
        padded = next(s for s in sizes if s >= t)
        assert padded - t < max(32, padded / 3)


def test_capture_size_zero_means_no_mixed_graphs():
    assert mixed_capture_sizes(0) == []


def test_decode_graphs_cover_every_batch_up_to_max_num_seqs():
    sizes = capture_sizes(200)
    assert sizes[0] == 1 and sizes[-1] == 200
    assert all(b - a <= 8 for a, b in zip(sizes, sizes[1:]))

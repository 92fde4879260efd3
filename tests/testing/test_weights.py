"""The one seeded initialisation every tiny checkpoint uses."""

from __future__ import annotations

import torch

from loomserve.testing.weights import init_weights


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(64, 64)
        self.LayerNorm = torch.nn.LayerNorm(64)
        self.input_layernorm = torch.nn.RMSNorm(64)


def test_the_same_seed_gives_the_same_weights():
    one, two, other = Block(), Block(), Block()
    init_weights(one, 0, 0.3)
    init_weights(two, 0, 0.3)
    init_weights(other, 1, 0.3)
    assert all(torch.equal(a, b) for a, b in zip(one.parameters(), two.parameters(), strict=True))
    assert not torch.equal(one.proj.weight, other.proj.weight)


def test_norm_gains_jitter_around_one_and_everything_else_around_zero():
    block = Block()
    init_weights(block, 0, 0.3)
    for gain in (block.LayerNorm.weight, block.input_layernorm.weight):
        assert (gain - 1).abs().max() < 0.5 and gain.std() > 0.05
    for centred in (block.proj.weight, block.proj.bias, block.LayerNorm.bias):
        assert centred.mean().abs() < 0.15 and 0.2 < centred.std() < 0.4

"""Linears on oneDNN-packed weights (CPU, float32): the same function as `F.linear`, and an LM head whose rows do not
depend on how many rows share the call (a request's logits must not depend on its step's batch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loomserve.platform.models.linear import ParallelLMHead


def lm_head(vocab: int = 5000, hidden: int = 64) -> ParallelLMHead:
    """Built as the loader builds models: outside inference mode, so the weight counts its in-place changes."""
    torch.manual_seed(0)
    head = ParallelLMHead(hidden, vocab).requires_grad_(False)
    torch.nn.init.normal_(head.weight, std=0.05)
    return head


def test_lm_head_equals_f_linear():
    head, hidden = lm_head(), torch.randn(7, 64)
    with torch.inference_mode():
        torch.testing.assert_close(head(hidden), F.linear(hidden, head.weight), rtol=1e-5, atol=1e-5)


def test_a_rows_logits_do_not_depend_on_the_rows_beside_it():
    head, hidden = lm_head(), torch.randn(33, 64)
    with torch.inference_mode():
        assert torch.equal(head(hidden)[5], head(hidden[5:6])[0])


def test_a_weight_changed_in_place_is_packed_again():
    head, hidden = lm_head(), torch.randn(3, 64)
    with torch.inference_mode():
        head(hidden)
    head.weight.mul_(2)  # what loading or a tied embedding's load does
    with torch.inference_mode():
        torch.testing.assert_close(head(hidden), F.linear(hidden, head.weight), rtol=1e-5, atol=1e-5)

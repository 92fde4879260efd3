"""The fused MoE path computes what transformers' experts compute: routing (top-k, each family's renormalisation)
and every token's weighted sum of its experts, through the grouped matmul and through its fallback loop."""

from __future__ import annotations

import pytest
import torch

from loomserve.platform.models import fused_moe
from loomserve.platform.models.fused_moe import fused_experts, select_experts


def hf_experts(num_experts: int, hidden: int, intermediate: int, seed: int):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = Qwen3MoeConfig(num_experts=num_experts, hidden_size=hidden, moe_intermediate_size=intermediate)
    experts = Qwen3MoeExperts(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in experts.parameters():
            param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return experts


def routed_inputs(num_tokens: int, hidden: int, num_experts: int, top_k: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=generator)
    logits = torch.randn(num_tokens, num_experts, generator=generator)
    weights, ids = select_experts(logits, top_k, renormalize=True)
    return x, weights, ids


@pytest.mark.parametrize("renormalize", [True, False])
def test_routing_equals_transformers_router(renormalize: bool) -> None:
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    router = Qwen3MoeTopKRouter(Qwen3MoeConfig(num_experts=8, num_experts_per_tok=2, hidden_size=16,
                                               norm_topk_prob=renormalize))
    torch.nn.init.normal_(router.weight, generator=torch.Generator().manual_seed(0))
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(1))
    logits, hf_weights, hf_ids = router(x)
    weights, ids = select_experts(logits, 2, renormalize)
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(weights, hf_weights)


@pytest.mark.parametrize("intermediate", [32, 6], ids=["grouped-mm", "loop-fallback"])
def test_fused_experts_equal_transformers_experts(intermediate: int) -> None:
    """Intermediate size 6 leaves rows unaligned for torch._grouped_mm: the fallback loop runs instead."""
    experts = hf_experts(8, 16, intermediate, seed=0)
    x, weights, ids = routed_inputs(37, 16, 8, top_k=2, seed=1)
    assert fused_moe._grouped_mm_runs(x, experts.down_proj) == (intermediate == 32)
    ours = fused_experts(x, experts.gate_up_proj.data, experts.down_proj.data, weights, ids)
    torch.testing.assert_close(ours, experts(x, ids, weights), rtol=1e-5, atol=1e-5)


def test_experts_no_token_chose_do_not_disturb_the_others() -> None:
    experts = hf_experts(8, 16, 32, seed=2)
    x, weights, _ = routed_inputs(5, 16, 8, top_k=2, seed=3)
    ids = torch.tensor([[0, 7]] * 5)  # experts 1..6 get no rows: empty runs in the grouped matmul
    ours = fused_experts(x, experts.gate_up_proj.data, experts.down_proj.data, weights, ids)
    torch.testing.assert_close(ours, experts(x, ids, weights), rtol=1e-5, atol=1e-5)

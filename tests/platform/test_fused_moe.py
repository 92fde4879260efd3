"""The fused MoE path computes what transformers' experts compute: routing (top-k, each family's renormalisation)
and every token's weighted sum of its experts, through each of the grouped matmul's paths."""

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


@pytest.mark.parametrize("skewed", [False, True], ids=["padded-bmm", "loop-over-runs"])
def test_fused_experts_equal_transformers_experts(skewed: bool) -> None:
    """Routing spread over the experts runs one padded batched matmul; routing piled onto two of sixteen experts
    would pad eightfold, and runs a loop over the experts' runs instead."""
    experts = hf_experts(16, 16, 32, seed=0)
    x, weights, ids = routed_inputs(400, 16, 16, top_k=2, seed=1)
    if skewed:
        ids = torch.stack([torch.zeros(400, dtype=torch.long), torch.ones(400, dtype=torch.long)], dim=1)
    counts = torch.bincount(ids.flatten(), minlength=16)
    padded = 16 * int(counts.max()) <= max(fused_moe._PAD_ROWS, fused_moe._PAD_FACTOR * ids.numel())
    assert padded != skewed
    ours = fused_experts(x, experts.gate_up_proj.data, experts.down_proj.data, weights, ids)
    torch.testing.assert_close(ours, experts(x, ids, weights), rtol=1e-5, atol=1e-5)


def test_experts_no_token_chose_do_not_disturb_the_others() -> None:
    experts = hf_experts(8, 16, 32, seed=2)
    x, weights, _ = routed_inputs(5, 16, 8, top_k=2, seed=3)
    ids = torch.tensor([[0, 7]] * 5)  # experts 1..6 get no rows: empty runs in the grouped matmul
    ours = fused_experts(x, experts.gate_up_proj.data, experts.down_proj.data, weights, ids)
    torch.testing.assert_close(ours, experts(x, ids, weights), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch._grouped_mm runs on CUDA")
def test_grouped_mm_kernel_equals_the_batched_reference_in_bfloat16() -> None:
    x, weights, ids = routed_inputs(300, 256, 16, top_k=4, seed=4)
    w13 = (0.05 * torch.randn(16, 512, 256)).bfloat16().cuda()
    w2 = (0.05 * torch.randn(16, 256, 256)).bfloat16().cuda()
    x, weights, ids = x.bfloat16().cuda(), weights.cuda(), ids.cuda()
    if not fused_moe._grouped_mm_runs(x, w13):
        pytest.skip("torch._grouped_mm needs a Hopper or newer GPU")
    ours = fused_experts(x, w13, w2, weights, ids)
    reference = fused_experts(x.float(), w13.float(), w2.float(), weights, ids)
    torch.testing.assert_close(ours.float(), reference, rtol=2e-2, atol=2e-2)

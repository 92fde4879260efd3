"""Mixture-of-experts math over packed tokens: top-k routing, and every expert's gated MLP as two grouped GEMMs.

The (token, expert) pairs are sorted by expert, so each expert's tokens sit in one contiguous run of rows; one
grouped matmul (`torch._grouped_mm`: one launch for all experts) then multiplies each run by its expert's weights.
Where the grouped matmul cannot run (unaligned sizes, or a CUDA device/dtype it does not take) a loop over the runs
computes the same rows.
"""

from __future__ import annotations

import torch

from loomserve.platform.models.layers import SiluAndMul

_silu_and_mul = SiluAndMul()


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, k] float32, expert ids [T, k] int64): the softmax's top k, rescaled to
    sum to one where the family does (Mixtral always; Qwen and OLMoE when `norm_topk_prob`)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def _grouped_mm_runs(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` takes x [N, in] times w [E, out, in]^T: rows 16-byte aligned, and on CUDA
    bf16 on Hopper or newer (the kernel's requirement)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    itemsize = x.element_size()
    if (w.shape[1] * itemsize) % 16 or (w.shape[2] * itemsize) % 16:
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return True


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [N, in] whose rows come in runs of `counts[e]` rows for expert e, times each expert's w [E, out, in]:
    [N, out]."""
    if _grouped_mm_runs(x, w):
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)  # [E] end row of each expert's run
        return torch._grouped_mm(x, w.transpose(1, 2), offs=offsets)
    out = x.new_empty((x.shape[0], w.shape[1]))
    start = 0
    for expert, count in enumerate(counts.tolist()):
        if count:
            torch.matmul(x[start : start + count], w[expert].t(), out=out[start : start + count])
            start += count
    return out


def sort_by_expert(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """expert_ids [N] -> (order [N]: the pairs grouped by expert, stable; counts [num_experts])."""
    order = torch.argsort(expert_ids, stable=True)
    return order, torch.bincount(expert_ids, minlength=num_experts)


def expert_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows x [N, hidden] in runs by expert -> each row's expert MLP down(silu(gate(x)) * up(x)): [N, hidden]."""
    gate_up = grouped_mm(x, w13, counts)  # [N, 2I]
    return grouped_mm(_silu_and_mul(gate_up), w2, counts)  # [N, I] -> [N, hidden]


def fused_experts(
    x: torch.Tensor,  # [T, hidden]
    w13: torch.Tensor,  # [E, 2I, hidden]: each expert's gate rows, then its up rows
    w2: torch.Tensor,  # [E, hidden, I]
    weights: torch.Tensor,  # [T, k] routing weights
    expert_ids: torch.Tensor,  # [T, k] in [0, E)
) -> torch.Tensor:  # [T, hidden]: sum over each token's k experts of weight * expert MLP
    top_k = expert_ids.shape[1]
    order, counts = sort_by_expert(expert_ids.flatten(), w13.shape[0])
    tokens = order // top_k  # [T * k] the token of each sorted (token, expert) pair
    out = expert_mlp(x[tokens], w13, w2, counts)  # [T * k, hidden]
    out = out * weights.flatten()[order].to(out.dtype).unsqueeze(-1)
    return torch.zeros_like(x).index_add_(0, tokens, out)

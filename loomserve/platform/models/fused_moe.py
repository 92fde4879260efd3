"""Mixture-of-experts math over packed tokens: top-k routing, and every expert's gated MLP as two grouped GEMMs.

The (token, expert) pairs are sorted by expert, so each expert's tokens sit in one contiguous run of rows; one
grouped matmul then multiplies each run by its expert's weights: `torch._grouped_mm` on CUDA (one launch for all
experts), else one batched matmul over the runs padded to the longest (torch's CPU `_grouped_mm` is a slow
reference), or, when routing is so skewed that padding would multiply the work, a loop over the runs.
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


_PAD_ROWS = 2048  # a padded batch this small always pays off (launches dominate)
_PAD_FACTOR = 4  # a larger one only while it holds at most this many times the real rows


def _grouped_mm_runs(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` takes x [N, in] times w [E, out, in]^T: CUDA, bf16, Hopper or newer (the
    kernel's requirement), rows 16-byte aligned."""
    if not (x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16):
        return False
    aligned = (w.shape[1] * x.element_size()) % 16 == 0 and (w.shape[2] * x.element_size()) % 16 == 0
    return aligned and torch.cuda.get_device_capability(x.device) >= (9, 0)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [N, in] whose rows come in runs of `counts[e]` rows for expert e, times each expert's w [E, out, in]:
    [N, out]."""
    if _grouped_mm_runs(x, w):
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)  # [E] end row of each expert's run
        return torch._grouped_mm(x, w.transpose(1, 2), offs=offsets)
    if x.is_cuda and torch.cuda.is_current_stream_capturing():  # no host reads: pad every run to all the rows
        return _padded_bmm(x, w, counts, x.shape[0])
    longest = int(counts.max())
    if w.shape[0] * longest <= max(_PAD_ROWS, _PAD_FACTOR * x.shape[0]):
        return _padded_bmm(x, w, counts, longest)
    return _loop_mm(x, w, counts)


def _padded_bmm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, longest: int) -> torch.Tensor:
    """Each run placed in its expert's row of a zero-padded [E, longest, in] batch, one bmm, the rows read back."""
    experts = torch.repeat_interleave(torch.arange(w.shape[0], device=x.device), counts,
                                      output_size=x.shape[0])  # [N] each row's expert (no host read)
    slots = torch.arange(x.shape[0], device=x.device) - (torch.cumsum(counts, 0) - counts)[experts]  # [N] in run
    padded = x.new_zeros((w.shape[0], longest, x.shape[1]))
    padded[experts, slots] = x
    return torch.bmm(padded, w.transpose(1, 2))[experts, slots]  # [E, longest, out] -> [N, out]


def _loop_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
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
    # index_add_ rather than bincount, whose output size is read back to the host: a CUDA graph can capture it
    counts = torch.zeros(num_experts, dtype=torch.long, device=expert_ids.device)
    return order, counts.index_add_(0, expert_ids, torch.ones_like(expert_ids))


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

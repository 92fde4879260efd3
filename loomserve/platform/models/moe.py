"""A mixture-of-experts layer: the router, the experts as two stacked weights, and (Qwen2-MoE) a shared expert.

The experts load from the checkpoint's per-expert tensors (`experts.N.gate_proj/up_proj/down_proj`, Mixtral's
`w1/w3/w2`) into `w13_weight [E, 2I, hidden]` and `w2_weight [E, hidden, I]`. With tensor parallelism each rank
holds a slice of every expert's intermediate dim and the ranks' outputs are summed; with expert parallelism each
rank holds whole experts, E / ranks of them, and the tokens travel to the rank of their expert and back (all-to-all).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loomserve.platform.distributed.communication import all_gather, all_reduce, all_to_all, exchange_counts
from loomserve.platform.distributed.parallel_state import TPGroup, divide, get_tp_group
from loomserve.platform.forward_batch import ForwardBatch
from loomserve.platform.models.layers import copy_checked, project
from loomserve.platform.models.linear import CheckpointTensor, narrow, shape_of

GATE, UP, DOWN = 0, 1, 2  # an expert's projections, as their shard ids name them


class Router(nn.Module):
    """The router's logits [T, E] (replicated on every rank; not an `nn.Linear`, so adapters leave it alone)."""

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, top_k: int, renormalize: bool,
                 tp: TPGroup | None = None) -> None:
        super().__init__()
        self.tp = tp or get_tp_group()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        if self.tp.expert_parallel:
            self.num_local_experts = divide(num_experts, self.tp.size, "the number of experts")
            self.intermediate = intermediate_size
        else:
            self.num_local_experts = num_experts
            self.intermediate = divide(intermediate_size, self.tp.size, "the experts' intermediate size")
        self.full_intermediate = intermediate_size
        self.expert_start = self.tp.rank * self.num_local_experts if self.tp.expert_parallel else 0
        self.w13_weight = nn.Parameter(torch.empty(self.num_local_experts, 2 * self.intermediate, hidden_size))
        self.w2_weight = nn.Parameter(torch.empty(self.num_local_experts, hidden_size, self.intermediate))

    def holds(self, expert: int) -> bool:
        return self.expert_start <= expert < self.expert_start + self.num_local_experts

    def num_shards(self, param: nn.Parameter) -> int:
        """Checkpoint tensors that fill `param`: gate and up of each local expert, or its down."""
        return self.num_local_experts * (2 if param is self.w13_weight else 1)

    def load_shard(self, param: nn.Parameter, shard_id: tuple[int, int], tensor: CheckpointTensor) -> None:
        """One expert's gate, up or down projection (shard_id (expert, GATE|UP|DOWN)) into its rows of `param`."""
        expert, projection = shard_id
        local = param.data[expert - self.expert_start]
        dim = 1 if projection == DOWN else 0  # down is split by its input columns, gate and up by output rows
        if shape_of(tensor)[dim] != self.full_intermediate:
            raise ValueError(f"checkpoint tensor has shape {shape_of(tensor)}, expected {self.full_intermediate} "
                             f"along dim {dim}")
        start = 0 if self.tp.expert_parallel else self.tp.rank * self.intermediate
        part = narrow(tensor, dim, start, self.intermediate)
        copy_checked(local if projection == DOWN else local.narrow(0, projection * self.intermediate,
                                                                   self.intermediate), part)

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> the weighted sum of each token's top-k experts [T, hidden], the same on every rank."""
        from loomserve.platform.models.fused_moe import fused_experts, select_experts

        weights, ids = select_experts(router_logits, self.top_k, self.renormalize)  # [T, k] each
        if self.tp.expert_parallel and self.tp.size > 1:
            return self._expert_parallel(x, weights, ids)
        return all_reduce(fused_experts(x, self.w13_weight, self.w2_weight, weights, ids), self.tp)

    def _expert_parallel(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Each rank routes its share of the tokens: every (token, expert) pair travels to the expert's rank
        (all-to-all, uneven counts), comes back computed, and the ranks' shares are gathered."""
        from loomserve.platform.models.fused_moe import expert_mlp, sort_by_expert

        rows = _share(x.shape[0], self.tp)
        mine, my_weights, my_ids = x[rows], weights[rows], ids[rows]  # [t, hidden], [t, k], [t, k]
        order, counts = sort_by_expert(my_ids.flatten(), self.num_experts)
        tokens = order // self.top_k  # [t * k]: pairs grouped by expert, so by destination rank too
        send = counts.view(self.tp.size, self.num_local_experts)  # [ranks, local experts] pairs this rank sends
        recv = exchange_counts(send, self.tp)  # [ranks, local experts] pairs each rank sends here
        send_rows, recv_rows = send.sum(1).tolist(), recv.sum(1).tolist()
        arrived = all_to_all(mine[tokens], send_rows, recv_rows, self.tp)  # [n, hidden], by source, then expert
        by_expert, expert_counts = sort_by_expert(_local_expert_ids(recv), self.num_local_experts)
        computed = torch.empty_like(arrived)
        computed[by_expert] = expert_mlp(arrived[by_expert], self.w13_weight, self.w2_weight, expert_counts)
        returned = all_to_all(computed, recv_rows, send_rows, self.tp)  # [t * k, hidden], in `order`
        returned = returned * my_weights.flatten()[order].to(returned.dtype).unsqueeze(-1)
        out = torch.zeros_like(mine).index_add_(0, tokens, returned)  # [t, hidden]
        return _gather_shares(out, x.shape[0], self.tp)


def _local_expert_ids(recv: torch.Tensor) -> torch.Tensor:
    """[ranks, local experts] counts of arrived pairs -> each arrived row's local expert [n] (rows come by source
    rank, then by expert)."""
    experts = torch.arange(recv.shape[1], device=recv.device).repeat(recv.shape[0])
    return torch.repeat_interleave(experts, recv.flatten())


def _share(num_tokens: int, tp: TPGroup) -> slice:
    """This rank's contiguous share of the tokens (the first ranks take one more when they do not divide)."""
    base, extra = divmod(num_tokens, tp.size)
    start = tp.rank * base + min(tp.rank, extra)
    return slice(start, start + base + (tp.rank < extra))


def _gather_shares(out: torch.Tensor, num_tokens: int, tp: TPGroup) -> torch.Tensor:
    """Every rank's share [t_r, hidden] -> all tokens [T, hidden]: padded to the largest share, gathered, trimmed."""
    largest = -(-num_tokens // tp.size)
    padded = torch.cat([out, out.new_zeros(largest - out.shape[0], out.shape[1])])
    gathered = all_gather(padded, tp, dim=0).view(tp.size, largest, -1)
    sizes = [(s.stop - s.start) for s in (_share(num_tokens, TPGroup(r, tp.size)) for r in range(tp.size))]
    return torch.cat([gathered[r, :n] for r, n in enumerate(sizes)])


class SparseMoeBlock(nn.Module):
    """Router + experts, plus Qwen2-MoE's shared expert scaled by its own sigmoid gate."""

    def __init__(self, config: Any, num_experts: int, intermediate_size: int, renormalize: bool,
                 shared_expert: nn.Module | None) -> None:
        super().__init__()
        self.gate = Router(config.hidden_size, num_experts)
        self.experts = FusedMoE(num_experts, config.hidden_size, intermediate_size, config.num_experts_per_tok,
                                renormalize)
        self.shared_expert = shared_expert
        if shared_expert is not None:
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        out = self.experts(x, self.gate(x))  # [T, hidden]
        if self.shared_expert is None:
            return out
        shared = self.shared_expert(x, batch)  # [T, hidden]
        return out + torch.sigmoid(project(self.shared_expert_gate, x, batch.lora)) * shared

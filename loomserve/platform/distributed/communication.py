"""Collectives over a `TPGroup`; each is the identity (no copy, no call) in a group of one."""

from __future__ import annotations

import torch

from loomserve.platform.distributed.parallel_state import TPGroup


def all_reduce(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """The sum of `x` over the ranks, in place."""
    if tp.size == 1:
        return x
    import torch.distributed as dist

    dist.all_reduce(x, group=tp.group)
    return x


def all_reduce_max(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """The elementwise max of `x` over the ranks, in place."""
    if tp.size == 1:
        return x
    import torch.distributed as dist

    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=tp.group)
    return x


def all_gather(x: torch.Tensor, tp: TPGroup, dim: int = -1) -> torch.Tensor:
    """Every rank's `x` concatenated along `dim`, in rank order."""
    if tp.size == 1:
        return x
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(tp.size)]
    dist.all_gather(parts, x.contiguous(), group=tp.group)
    return torch.cat(parts, dim=dim)


def all_to_all(x: torch.Tensor, send_counts: list[int], recv_counts: list[int], tp: TPGroup) -> torch.Tensor:
    """Rows of `x` [N, ...] sent in rank order, `send_counts[r]` to rank r; returns the rows received
    [sum(recv_counts), ...], `recv_counts[r]` from rank r."""
    import torch.distributed as dist

    out = x.new_empty((sum(recv_counts), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=tp.group)
    return out


def exchange_counts(send_counts: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """[size] counts this rank sends to each rank -> [size] counts it receives from each."""
    import torch.distributed as dist

    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts, group=tp.group)
    return recv

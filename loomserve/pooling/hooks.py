"""The pooling feature's runner hook: where each finishing pooling request's tokens sit in the batch, the segment
ids of cross-encoder pairs, and the pooled outputs made from the step's hidden states. (The scheduler needs no
hook: a pooling request's prompt simply ends its run, which the step marks with `pools`.)"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from loomserve.platform.features import RunnerHook
from loomserve.pooling.batch import PoolingSpan, token_type_ids
from loomserve.pooling.poolers import Pooler

if TYPE_CHECKING:
    from loomserve.platform.config import EngineConfig
    from loomserve.platform.input_batch import BatchInputs
    from loomserve.platform.step import ScheduledStep


def runner_hook(config: EngineConfig, model: nn.Module, device: torch.device) -> PoolingRunnerHook:
    return PoolingRunnerHook(Pooler(model, config.model_config.pooler_config), device)


class PoolingRunnerHook(RunnerHook):
    name = "pooling"

    def __init__(self, pooler: Pooler, device: torch.device) -> None:
        self.pooler = pooler
        self.device = device

    def prepare(self, step: ScheduledStep, batch: BatchInputs) -> None:
        start = 0
        for s, state in zip(batch.scheduled, batch.requests):
            if s.pools:
                batch.pooling.append(PoolingSpan.of(state, start, start + s.num_new_tokens))
            start += s.num_new_tokens
        batch.forward.token_type_ids = token_type_ids(batch.pooling, start, self.device)

    def pool(self, hidden: torch.Tensor, batch: BatchInputs) -> dict[str, torch.Tensor]:
        return self.pooler(hidden, batch.pooling)

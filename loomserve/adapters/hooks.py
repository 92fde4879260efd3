"""The LoRA feature's hooks: admission beside the scheduler, adapter slots and host cache in the runner."""

from __future__ import annotations

import concurrent.futures
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from loomserve.adapters.request import LoRARequest
from loomserve.adapters.scheduling import LoRAAdmission
from loomserve.platform.cuda_graphs import max_graph_tokens
from loomserve.platform.features import RunnerHook

if TYPE_CHECKING:
    from loomserve.adapters.manager import LoRAManager
    from loomserve.platform.config import EngineConfig
    from loomserve.platform.forward_batch import ForwardBatch
    from loomserve.platform.input_batch import BatchInputs
    from loomserve.platform.step import ScheduledStep

_LOAD_WAIT_S = 0.005  # how long a step with nothing to run waits for an adapter to finish loading


def scheduler_hook(config: EngineConfig) -> LoRAAdmission | None:
    return None if config.lora_config is None else LoRAAdmission(config.lora_config.max_loras)


def runner_hook(config: EngineConfig, model: nn.Module, device: torch.device) -> LoRARunnerHook | None:
    if config.lora_config is None:
        return None
    from loomserve.adapters.manager import LoRAManager

    return LoRARunnerHook(LoRAManager(model, config.lora_config, device, max_graph_tokens(config)))


class LoRARunnerHook(RunnerHook):
    name = "lora"

    def __init__(self, manager: LoRAManager) -> None:
        self.manager = manager

    def begin_step(self, step: ScheduledStep) -> None:
        """Start reading the adapters the scheduler asked for; with nothing to run, wait a little for a load."""
        data = step.features.get(self.name)
        for lora in data["load"] if data else ():
            self.manager.ready(LoRARequest.from_wire(lora))
        if not step.scheduled:
            self.manager.wait(_LOAD_WAIT_S)

    def prepare(self, step: ScheduledStep, batch: BatchInputs) -> None:
        data = step.features.get(self.name)
        loras = [r.lora_request for r in batch.requests]
        num_tokens = [s.num_new_tokens for s in batch.scheduled]
        active = [LoRARequest.from_wire(lora) for lora in data["active"]] if data else []
        batch.forward.lora = self.manager.prepare(loras, num_tokens, active)

    def for_graph(self, batch: ForwardBatch) -> None:
        batch.lora = self.manager.graph_batch(batch.positions.shape[-1])

    def result(self) -> dict[str, Any]:
        return self._report(self.manager.take_failures())

    def _report(self, failed: dict[int, str]) -> dict[str, Any]:
        return {"cached": list(self.manager.cpu), "failed": {str(i): why for i, why in failed.items()}}

    def call(self, method: str, *args: Any) -> Any:
        """add (now, raising ValueError when the adapter cannot be served), start_add (a future, done once read),
        remove; adapters travel in their wire form. The answer is the host cache, for the scheduler's hook; failed
        background loads wait for a step's result, whose landing ends their requests with an output."""
        if method == "add":
            self.manager.add(LoRARequest.from_wire(*args))
            return self._report({})
        if method == "start_add":
            read: concurrent.futures.Future = concurrent.futures.Future()
            loading = self.manager.start_add(LoRARequest.from_wire(*args))
            loading.add_done_callback(lambda f: _settle(read, f))
            return read
        if method == "remove":
            self.manager.remove(*args)
            return self._report({})
        return super().call(method, *args)


def _settle(future: concurrent.futures.Future, done: concurrent.futures.Future) -> None:
    """`future` ends as `done` did, with no value (the host cache reaches the scheduler with the next step)."""
    if done.exception() is None:
        future.set_result(None)
    else:
        future.set_exception(done.exception())

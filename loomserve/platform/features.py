"""How features (LoRA, media encoders, pooling, speculative decoding, later KV transfer) plug into the engine.

A feature has two halves. Its `SchedulerHook` lives beside the scheduler: it decides which waiting requests may
start and how far a chunk may go, and each step it puts its data in `ScheduledStep.features[name]`. Its
`RunnerHook` lives in each runner: it reads that data, adds its part to the step's forward inputs, acts on the
hidden states, and puts its result in `StepResult.features[name]`, which comes back to the scheduler hook. The
halves share only plain values (lists, dicts, numbers, strings, bytes), so a runner may live in another process.

Features are registered here by name with where their hooks are made ("module:function"), and made from the
config by `scheduler_hooks` / `runner_hooks`; `platform/` never imports a feature's behaviour itself.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn

    from loomserve.platform.config import EngineConfig
    from loomserve.platform.forward_batch import ForwardBatch
    from loomserve.platform.input_batch import BatchInputs
    from loomserve.platform.kv_cache import KVCacheManager
    from loomserve.platform.request import Request
    from loomserve.platform.step import ScheduledStep


class SchedulerHook(Protocol):
    """A feature's say in scheduling; every method has a do-nothing default."""

    name: str

    def attach_kv(self, kv: KVCacheManager) -> None:
        """The scheduler's KV cache manager, once made (a KV connector reads and takes its blocks)."""

    def add_request(self, request: Request) -> None:
        """A request was queued: work it needs before it may start (compiling its grammar) can begin now."""

    def take_refused(self) -> dict[str, str]:
        """Requests the feature found it cannot serve outside a step's result (id -> why), each reported once."""
        return {}

    def busy(self) -> bool:
        """Whether the feature needs steps with no request to run (e.g. to tell its runner hook to serve blocks)."""
        return False

    def begin_step(self, running: list[Request]) -> None:
        """Before a step's admissions."""

    def admits(self, request: Request) -> bool:
        """Whether a waiting request may start now."""
        return True

    def fit(self, request: Request, start: int, num_tokens: int) -> int:
        """How many of the request's next `num_tokens` tokens (from `start`) the feature lets this step run."""
        return num_tokens

    def commit(self, request: Request, start: int, num_tokens: int) -> None:
        """The step runs those tokens."""

    def release(self, request: Request) -> None:
        """The request finished or was preempted."""

    def step_data(self, running: list[Request]) -> Any:
        """What the runner hooks get for this step in `features[name]`; None: nothing."""
        return None

    def update(self, result: Any, requests: dict[str, Request]) -> dict[str, str]:
        """Take in the runner hooks' result; returns the requests the feature cannot serve (id -> why)."""
        return {}

    def allow_late_step_data(self) -> None:
        """The engine's runner shares its process: it will ask `late_step_data` before each step samples."""

    def late_step_data(self) -> Any:
        """Step data that needs the step before landed (a grammar bitmask needs its tokens), asked for once the
        step's forward is under way and the step before has landed, just before it samples; None: nothing."""
        return None

    def holds_run_ahead(self) -> bool:
        """Whether the next step must wait for the one in flight to land (its result decides what the next runs)."""
        return False


class RunnerHook(Protocol):
    """A feature's part in running a step; every method has a do-nothing default."""

    name: str

    def register_kv_caches(self, kv_caches: list[torch.Tensor]) -> None:
        """The runner's KV cache, once allocated: per layer [2, num_blocks, block_size, kv_heads, head_dim]."""

    def begin_step(self, step: ScheduledStep) -> None:
        """Every step, also one with no tokens to run (which then only carries features' data)."""

    def prepare(self, step: ScheduledStep, batch: BatchInputs) -> None:
        """Add the feature's forward inputs to the packed batch (before the model runs)."""

    def for_graph(self, batch: ForwardBatch) -> None:
        """Add the feature's part to the ForwardBatch a CUDA graph is captured with (made inside the capture, so made
        anew on each replay)."""

    def for_profile(self, batch: ForwardBatch) -> None:
        """Add the inputs the feature gives a step to the ForwardBatch of the memory profile, which has no requests
        (e.g. cross-attention keys and values of the longest encoder output)."""

    def after_sample(self, batch: BatchInputs, sampled: torch.Tensor) -> None:
        """The step's rows are sampled (`sampled` [rows] on the device, in `batch.logits_indices` order, empty when
        none samples) and their copy to the host is under way: device work that needs them (an EAGLE head's pass)."""

    def pool(self, hidden: torch.Tensor, batch: BatchInputs) -> dict[str, torch.Tensor]:
        """Per-request outputs made from the step's hidden states [T, hidden] (on the device)."""
        return {}

    def result(self) -> Any:
        """What goes back to the scheduler hook in `StepResult.features[name]`; None: nothing."""
        return None

    def land(self, sampled: dict[str, list[int]]) -> Any:
        """A step's tokens reached the host (request id -> its new tokens); what goes back to the scheduler hook in
        `StepResult.features[name]` in place of `result()`'s; None: nothing more."""
        return None

    def kv_bytes_per_block(self) -> int:
        """KV-cache bytes the feature keeps per block beside the model's (a draft model's own layers)."""
        return 0

    def init_kv_cache(self, num_blocks: int) -> None:
        """Allocate the feature's KV cache of `num_blocks` blocks (it shares the model's block tables)."""

    def release(self, request_ids: list[str]) -> None:
        """The runner forgot these requests."""

    def call(self, method: str, *args: Any) -> Any:
        """An engine call addressed to this feature (e.g. add_lora); raises ValueError when it cannot be done."""
        raise ValueError(f"unknown engine call {method!r}")


# Feature name -> (scheduler hook factory, runner hook factory): "module:function" taking the config (and, for the
# runner side, the model and the device), returning the hook or None when the feature is off for this model.
FEATURES: dict[str, tuple[str | None, str | None]] = {
    "lora": ("loomserve.adapters.hooks:scheduler_hook", "loomserve.adapters.hooks:runner_hook"),
    "mm": ("loomserve.modalities.hooks:scheduler_hook", "loomserve.modalities.hooks:runner_hook"),
    "pooling": (None, "loomserve.pooling.hooks:runner_hook"),
    "kv_offload": ("loomserve.platform.kv_transfer.offload:scheduler_hook",
                   "loomserve.platform.kv_transfer.offload:runner_hook"),
    "kv_pd": ("loomserve.platform.kv_transfer.disagg:scheduler_hook",
              "loomserve.platform.kv_transfer.disagg:runner_hook"),
    "spec": ("loomserve.platform.spec_decode.hooks:scheduler_hook", "loomserve.platform.spec_decode.hooks:runner_hook"),
    "structured": ("loomserve.platform.structured.scheduling:scheduler_hook", None),
    "prompt_embeds": (None, "loomserve.platform.prompt_embeds:runner_hook"),
    "cross_attn": ("loomserve.platform.cross_kv_store:scheduler_hook", "loomserve.platform.cross_kv_store:runner_hook"),
}


# What a request, or a call, that needs a feature the engine runs without is told.
FEATURE_OFF = {
    "lora": "LoRA is not enabled: start the engine with enable_lora=True (--enable-lora)",
    "mm": "this model takes no media input",
}


def feature_off(name: str) -> ValueError:
    return ValueError(FEATURE_OFF.get(name, f"the {name} feature is not enabled on this engine"))


def find_hook(hooks: list[Any], name: str) -> Any:
    """The hook of feature `name` among `hooks` (scheduler or runner side), or None when the feature is off."""
    return next((h for h in hooks if h.name == name), None)


def _factory(target: str) -> Any:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def scheduler_hooks(config: EngineConfig) -> list[SchedulerHook]:
    hooks = (_factory(s)(config) for s, _ in FEATURES.values() if s is not None)
    return [h for h in hooks if h is not None]


def runner_hooks(config: EngineConfig, model: nn.Module, device: torch.device) -> list[RunnerHook]:
    hooks = (_factory(r)(config, model, device) for _, r in FEATURES.values() if r is not None)
    return [h for h in hooks if h is not None]

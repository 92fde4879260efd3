"""Adapters in device slots and a host LRU cache, loaded from disk on demand in a background thread.

The engine's model gets its LoRA layers here (`max_loras` slots each). An adapter's weights live in the
host cache (at most `max_cpu_loras`, least recently used evicted first) and, while requests use it, in a
slot. Adapters of running requests (`pinned`) are never evicted from either. Reading an adapter folder
happens off the engine loop (a worker thread), so loading never stalls the other requests' steps; the
loop only moves finished loads into the cache and copies weights into slots.

Each step's `prepare` returns the step's `LoRABatch`, which the runner passes down in the forward's `ForwardBatch`.
With the Triton kernels the manager also makes the LoRA layers fit CUDA graphs: it compiles the kernels
before any capture, gives each capture a batch derived on the device from `LoRAState.graph_slots`
(`graph_batch`), and writes every step's token slots into that buffer, so a replay reads them.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from loomserve.adapters.layers import LoRABatch, add_lora_layers
from loomserve.adapters.lora import LoRAModel, load_lora_model
from loomserve.adapters.ops import add_lora
from loomserve.adapters.request import LoRARequest
from loomserve.platform.config import LoRAConfig

logger = logging.getLogger(__name__)


def default_backend(device: torch.device) -> str:
    """Triton kernels on CUDA where triton is installed, else the torch reference."""
    if device.type != "cuda":
        return "torch"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "torch"
    return "triton"


class LoRAManager:
    def __init__(self, model: nn.Module, config: LoRAConfig, device: torch.device, max_graph_tokens: int) -> None:
        self.config = config
        self.device = device
        self.state, self.layers, self.targets = add_lora_layers(
            model, config.max_loras, config.max_lora_rank, default_backend(device)
        )
        self.canonical_name = model.canonical_name  # adapter module names -> the model's
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no linear layers to put LoRA adapters on")
        self.dtype = next(iter(self.layers.values())).lora_a.dtype
        if self.state.backend == "triton":
            self.state.graph_slots = torch.full((max_graph_tokens,), -1, dtype=torch.int32, device=device)
            self._graph_slots_clear = True
            self._compile_kernels()
        self.known: dict[int, LoRARequest] = {}  # id -> its adapter: an id always names one adapter
        self.cpu: OrderedDict[int, LoRAModel] = OrderedDict()  # least recently used first
        self.slots: list[int | None] = [None] * config.max_loras  # adapter id in each slot
        self.slot_of: dict[int, int] = {}  # adapter id -> its slot
        self.removed: set[int] = set()  # forgotten adapters whose weights are still held
        self.slot_last_step = [0] * config.max_loras
        self.pinned: set[int] = set()
        self.loads: dict[int, concurrent.futures.Future[LoRAModel]] = {}
        self.failures: dict[int, str] = {}
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-load")
        self.step = 0
        slot_bytes = sum(layer.lora_a[0].nbytes + layer.lora_b[0].nbytes for layer in self.layers.values())
        logger.info("LoRA: %d layers, %d slots of rank %d (%.1f MiB), host cache of %d adapters, %s kernels",
                    len(self.layers), config.max_loras, config.max_lora_rank,
                    slot_bytes * config.max_loras / 2**20, config.max_cpu_loras, self.state.backend)

    # ------------------------------------------------------------------ host cache

    def add(self, lora: LoRARequest) -> None:
        """Load (or find) an adapter now; raises ValueError (LoRALoadError) when it cannot be served."""
        self._claim(lora)
        if lora.lora_int_id in self.cpu:
            self.cpu.move_to_end(lora.lora_int_id)
            return
        try:
            model = self._read(lora)
        except ValueError:
            self.known.pop(lora.lora_int_id, None)
            raise
        self._insert(model)

    def start_add(self, lora: LoRARequest) -> concurrent.futures.Future[LoRAModel]:
        """Load an adapter in the background; the future fails with the reason if it cannot be served."""
        self._claim(lora)
        if lora.lora_int_id in self.cpu:
            done: concurrent.futures.Future[LoRAModel] = concurrent.futures.Future()
            done.set_result(self.cpu[lora.lora_int_id])
            return done
        return self._submit(lora)

    def ready(self, lora: LoRARequest) -> bool:
        """Whether a request of this adapter can run now (then it is pinned); if not, its load is under way."""
        self._collect()
        lora_id = lora.lora_int_id
        if lora_id in self.cpu or lora_id in self.slot_of:
            self.pinned.add(lora_id)
            if lora_id in self.cpu:
                self.cpu.move_to_end(lora_id)
            return True
        if lora_id not in self.loads and lora_id not in self.failures:
            try:
                self._claim(lora)
            except ValueError as e:
                self.failures[lora_id] = str(e)
                return False
            self._submit(lora)
        return False

    def remove(self, lora_id: int) -> None:
        """Forget an adapter; its weights go now, or once no running request uses them."""
        self.known.pop(lora_id, None)
        self.removed.add(lora_id)
        self._drop_removed()

    def _drop_removed(self) -> None:
        for lora_id in [i for i in self.removed if i not in self.pinned]:
            self.removed.discard(lora_id)
            if lora_id in self.known:  # claimed again since (a request of a new adapter with the id)
                continue
            self.cpu.pop(lora_id, None)
            slot = self.slot_of.pop(lora_id, None)
            if slot is not None:
                self.slots[slot] = None

    def take_failures(self) -> dict[int, str]:
        """Adapters whose background load failed since the last call (id -> reason)."""
        self._collect()
        failures, self.failures = self.failures, {}
        return failures

    def wait(self, timeout: float) -> None:
        """Block until a background load finishes or `timeout` seconds pass (for an engine with nothing to run)."""
        if self.loads:
            concurrent.futures.wait(list(self.loads.values()), timeout, concurrent.futures.FIRST_COMPLETED)

    def _claim(self, lora: LoRARequest) -> None:
        owner = self.known.setdefault(lora.lora_int_id, lora)
        if owner != lora:
            raise ValueError(f"LoRA id {lora.lora_int_id} already names adapter {owner.lora_name!r} "
                             f"({owner.lora_path}); give {lora.lora_name!r} another id")

    def _read(self, lora: LoRARequest) -> LoRAModel:
        model = load_lora_model(lora, self.targets, self.config.max_lora_rank, self.dtype, self.canonical_name)
        if self.device.type == "cuda":  # page-locked, so copies into slots run asynchronously
            for slices in model.weights.values():
                for w in slices.values():
                    w.a, w.b = w.a.pin_memory(), w.b.pin_memory()
        return model

    def _submit(self, lora: LoRARequest) -> concurrent.futures.Future[LoRAModel]:
        future = self.executor.submit(self._read, lora)
        self.loads[lora.lora_int_id] = future
        return future

    def _collect(self) -> None:
        """Move finished background loads into the cache (on the engine's thread)."""
        for lora_id, future in list(self.loads.items()):
            if not future.done():
                continue
            del self.loads[lora_id]
            error = future.exception()
            if error is not None:
                logger.warning("cannot load LoRA adapter %d: %s", lora_id, error)
                self.failures[lora_id] = str(error)
                self.known.pop(lora_id, None)
            elif lora_id in self.known:  # not removed while it loaded
                self._insert(future.result())

    def _insert(self, model: LoRAModel) -> None:
        lora_id = model.request.lora_int_id
        self.cpu[lora_id] = model
        self.cpu.move_to_end(lora_id)
        while len(self.cpu) > self.config.max_cpu_loras:
            victim = next((i for i in self.cpu if i not in self.pinned and i != lora_id), None)
            if victim is None:
                break
            del self.cpu[victim]

    # ------------------------------------------------------------------ device slots and CUDA graphs

    def graph_batch(self, num_tokens: int) -> LoRABatch | None:
        """The batch a CUDA graph of `num_tokens` tokens is captured with: computed on the device from `graph_slots`
        inside the graph, so each replay groups whatever tokens the buffer then names. None with the torch
        kernels, whose batches need host copies a graph would freeze."""
        if self.state.graph_slots is None:
            return None
        return LoRABatch.for_graph(self.state.graph_slots[:num_tokens], self.config.max_loras)

    @torch.inference_mode()
    def _compile_kernels(self) -> None:
        """Run each layer shape's kernels once (on zero weights), for an eager batch and for a CUDA graph's (one
        segment per slot, all empty here), so no compilation happens inside a capture."""
        batches = (LoRABatch.build(np.zeros(1, dtype=np.int64), self.device),
                   LoRABatch.for_graph(self.state.graph_slots[:1], self.config.max_loras))
        seen = set()
        for layer in self.layers.values():
            shape = (layer.in_features, tuple(layer.output_sizes))
            if shape not in seen:
                seen.add(shape)
                x = torch.zeros(1, layer.in_features, dtype=self.dtype, device=self.device)
                y = torch.zeros(1, sum(layer.output_sizes), dtype=self.dtype, device=self.device)
                for batch in batches:
                    add_lora(y, x, layer, batch, self.state.backend)

    def _write_graph_slots(self, token_slots: np.ndarray, any_adapter: bool) -> None:
        """Every step's token slots, with -1 after them, for a CUDA-graph replay (stream-ordered copies)."""
        graph_slots = self.state.graph_slots
        n = len(token_slots)
        if n > graph_slots.numel() or (not any_adapter and self._graph_slots_clear):
            return  # too many tokens for a graph, or nothing to change
        graph_slots.fill_(-1)
        if any_adapter:
            graph_slots[:n].copy_(torch.from_numpy(token_slots.astype(np.int32)).to(self.device, non_blocking=True))
        self._graph_slots_clear = not any_adapter

    def prepare(self, loras: list[LoRARequest | None], num_tokens: list[int],
                active: list[LoRARequest]) -> LoRABatch | None:
        """Put the step's adapters into slots and return the step's batch of token slots, None when no token uses an
        adapter: request i runs `num_tokens[i]` tokens under `loras[i]` (None: the base model), in batch order;
        `active` are the running requests' adapters, kept in their slots and host copies. Also writes the slots where
        a CUDA-graph replay reads them."""
        self.step += 1
        self.pinned = {lora.lora_int_id for lora in active}
        if self.removed:
            self._drop_removed()
        wanted = {lora.lora_int_id for lora in loras if lora is not None}
        for lora in loras:
            if lora is not None and lora.lora_int_id not in self.cpu and lora.lora_int_id not in self.slot_of:
                self.add(lora)  # evicted since the scheduler saw it cached (a step in flight): read it now
        slot_of = {lora_id: self._slot_for(lora_id, wanted) for lora_id in wanted}
        per_request = [slot_of[lora.lora_int_id] if lora is not None else -1 for lora in loras]
        token_slots = np.repeat(np.asarray(per_request, dtype=np.int64), num_tokens)
        if self.state.graph_slots is not None:
            self._write_graph_slots(token_slots, bool(wanted))
        return LoRABatch.build(token_slots, self.device) if wanted else None

    def _slot_for(self, lora_id: int, wanted: set[int]) -> int:
        slot = self.slot_of.get(lora_id)
        if slot is None:
            free = [i for i, s in enumerate(self.slots) if s is None or (s not in self.pinned and s not in wanted)]
            if not free:
                raise RuntimeError(f"no LoRA slot free for adapter {lora_id}: more than max_loras adapters run")
            slot = min(free, key=lambda i: (self.slots[i] is not None, self.slot_last_step[i]))
            model = self.cpu[lora_id]
            for name, layer in self.layers.items():
                layer.set_slot(slot, model.weights.get(name, {}))
            self.slot_of.pop(self.slots[slot], None)
            self.slots[slot] = lora_id
            self.slot_of[lora_id] = slot
        self.slot_last_step[slot] = self.step
        return slot

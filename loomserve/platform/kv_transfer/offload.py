"""The CPU tier of the prefix cache (`--kv-offloading-size`): a feature whose scheduler hook decides which blocks
move, and whose runner hook moves them (`copier.py`).

A cached block the device pool hands to a new owner is stored first, under the same block hash, in a host block
(least recently used host blocks make room). A waiting request whose prefix continues in the host pool past what
the device still holds gets device blocks for that part and a load; it waits, held back by `admits`, until the
runner reports the load landed; it then starts as on any prefix hit (`loads.py`). A preempted request's full
blocks take the same way back: freed into the prefix cache, stored on eviction, loaded on its resumption, so
preemption recomputes at most its last partial block.

Step data (`features["kv_offload"]`): `store` = [device ids, host ids], `load` = [[request id, host ids, device
ids], ...]. Result: `loaded` = the request ids whose loads have landed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from loomserve.platform.features import RunnerHook
from loomserve.platform.kv_cache.manager import kv_block_bytes
from loomserve.platform.kv_transfer.copier import BlockCopier
from loomserve.platform.kv_transfer.host_pool import HostBlockPool
from loomserve.platform.kv_transfer.loads import BlockLoads

if TYPE_CHECKING:
    from loomserve.platform.config import EngineConfig
    from loomserve.platform.kv_cache import KVCacheManager
    from loomserve.platform.request import Request
    from loomserve.platform.step import ScheduledStep

logger = logging.getLogger(__name__)

NAME = "kv_offload"


def num_host_blocks(config: EngineConfig) -> int:
    """Host blocks the configured CPU-tier size holds; 0 when the tier is off."""
    kt = config.kv_transfer_config
    if kt is None or not kt.offload_bytes or config.model_config.encoder_only:
        return 0
    return kt.offload_bytes // kv_block_bytes(config.model_config, config.cache_config)


def scheduler_hook(config: EngineConfig) -> OffloadScheduler | None:
    n = num_host_blocks(config)
    return OffloadScheduler(n) if n else None


def runner_hook(config: EngineConfig, model: nn.Module, device: torch.device) -> OffloadWorker | None:
    n = num_host_blocks(config)
    return OffloadWorker(n) if n else None


class OffloadScheduler(BlockLoads):
    name = NAME

    def __init__(self, num_blocks: int) -> None:
        super().__init__()
        self.host = HostBlockPool(num_blocks)
        self.stores: list[list[int]] = [[], []]  # device ids, host ids: evicted since the last step
        self.loads: list[list[Any]] = []  # issued since the last step
        self.stored_blocks = 0

    def attach_kv(self, kv: KVCacheManager) -> None:
        super().attach_kv(kv)
        kv.pool.on_evict = self._store

    def _store(self, block_id: int, block_hash: bytes) -> None:
        host_id = self.host.take(block_hash)
        if host_id is not None:
            self.stores[0].append(block_id)
            self.stores[1].append(host_id)
            self.stored_blocks += 1

    def admits(self, request: Request) -> bool:
        """False while the request's blocks load; starts a load when its prefix continues in the host pool and the
        device pool has room for the rest of the prompt too."""
        if request.request_id in self.loading:
            return False
        if request.needs_whole_prompt:
            return True
        on_device = self.kv.cached_prefix(request)
        hashes = self._host_prefix(request, len(on_device))
        if not hashes or not self.has_room(request, on_device, len(hashes)):
            return True  # nothing there, or no room to run it after the load either: the scheduler decides
        host_ids = self.host.read(hashes)  # kept from eviction by the stores the allocation may cause
        device_ids = self.start_load(request, on_device, hashes, host_ids)
        self.loads.append([request.request_id, host_ids, device_ids])
        return False

    def _host_prefix(self, request: Request, start: int) -> list[bytes]:
        """The hashes of the request's blocks from block `start` on that the host pool holds, up to the first miss."""
        found: list[bytes] = []
        tokens = request.all_token_ids
        for i in range(start, self.kv.max_hit_blocks(request)):
            block_hash = self.kv.block_hashes(request, i + 1, tokens)[i]
            if self.host.lookup(block_hash) is None:
                break
            found.append(block_hash)
        return found

    def step_data(self, running: list[Request]) -> dict[str, Any] | None:
        if not (self.stores[0] or self.loads):
            return None
        data = {"store": self.stores, "load": self.loads}
        self.stores, self.loads = [[], []], []
        return data

    def update(self, result: dict[str, Any], requests: dict[str, Request]) -> dict[str, str]:
        """Loads that landed: their blocks join the device prefix cache."""
        for request_id in result["loaded"]:
            self.host.done_reading(self.land(request_id, ok=True).source)
        return {}


class OffloadWorker(RunnerHook):
    name = NAME

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.copier: BlockCopier | None = None
        self.loads: list[tuple[str, torch.cuda.Event | None]] = []  # in flight: request id, landed event

    def register_kv_caches(self, kv_caches: list[torch.Tensor]) -> None:
        self.copier = BlockCopier(kv_caches, self.num_blocks)
        logger.info("CPU KV tier: %d blocks (%.2f GiB)", self.num_blocks,
                    self.copier.host.numel() * self.copier.host.element_size() / 2**30)

    def begin_step(self, step: ScheduledStep) -> None:
        """Stores before loads (a load may read a host block stored this step), both before the step's forward."""
        data = step.features.get(self.name)
        if data is not None:
            device_ids, host_ids = data["store"]
            if device_ids:
                self.copier.store(device_ids, host_ids)
            for request_id, host_ids, device_ids in data["load"]:
                self.loads.append((request_id, self.copier.load(host_ids, device_ids)))
        if self.loads and not step.scheduled:  # nothing else to do: let the loads land
            self.copier.wait()

    def result(self) -> dict[str, list[str]] | None:
        landed = [request_id for request_id, done in self.loads if done is None or done.query()]
        if not landed:
            return None
        self.loads = [(request_id, done) for request_id, done in self.loads if request_id not in landed]
        return {"loaded": landed}

"""The CPU tier of the prefix cache (`--kv-offloading-size`): a feature whose scheduler hook decides which blocks
move, and whose runner hook moves them (`copier.py`).

A cached block the device pool hands to a new owner is stored first, under the same block hash, in a host block
(least recently used host blocks make room). A waiting request whose prefix continues in the host pool past what
the device still holds gets device blocks for that part and a load, and is scheduled in the same step as on any
prefix hit: the loaded blocks join the device prefix cache at once, because the runner issues the step's copies
before its forward and the forward waits for them (`copier.py`). A preempted request's full blocks take the same
way back: freed into the prefix cache, stored on eviction, loaded on its resumption, so preemption recomputes at
most its last partial block.

A host block a load reads is kept from stores until the step's data has gone out: the runner issues a step's
stores before its loads, and a later step's stores after them, on one stream.

Step data (`features["kv_offload"]`): `store` = [device ids, host ids], `load` = [host ids, device ids].
`loads` (request id -> tokens loaded for it) is what the step's scheduling loaded, for benchmarks and tests.
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
        self.step_loads: list[list[int]] = [[], []]  # host ids, device ids: loaded by this step
        self.loads: dict[str, int] = {}  # request id -> tokens loaded for it by this step's scheduling
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

    def begin_step(self, running: list[Request]) -> None:
        super().begin_step(running)
        self.loads = {}

    def admits(self, request: Request) -> bool:
        """Always; first loads the part of the request's prefix that continues in the host pool, when the device pool
        has room for it and the rest of the prompt: the request then finds it in the prefix cache."""
        if request.needs_whole_prompt or request.needs_prompt_logprobs:
            return True  # no prefix hit is taken for them
        on_device = self.kv.cached_prefix(request)
        hashes = self._host_prefix(request, len(on_device))
        if hashes and self.has_room(request, on_device, len(hashes)):
            host_ids = self.host.read(hashes)  # kept from eviction by the stores the allocation may cause
            device_ids = self.start_load(request, on_device, hashes)
            self.land(request.request_id, ok=True)  # landed by the time this step's forward reads it
            self.step_loads[0] += host_ids
            self.step_loads[1] += device_ids
            self.loads[request.request_id] = len(hashes) * self.kv.block_size
        return True

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
        if not (self.stores[0] or self.step_loads[0]):
            return None
        data = {"store": self.stores, "load": self.step_loads}
        self.host.done_reading(self.step_loads[0])  # later stores run after these loads
        self.stores, self.step_loads = [[], []], [[], []]
        return data


class OffloadWorker(RunnerHook):
    name = NAME

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.copier: BlockCopier | None = None

    def register_kv_caches(self, kv_caches: list[torch.Tensor]) -> None:
        self.copier = BlockCopier(kv_caches, self.num_blocks)
        logger.info("CPU KV tier: %d blocks (%.2f GiB), allocated in chunks of %d blocks", self.num_blocks,
                    self.copier.host.nbytes / 2**30, self.copier.host.blocks_per_chunk)

    def begin_step(self, step: ScheduledStep) -> None:
        """Stores before loads (a load may read a host block stored this step), both before the step's forward."""
        data = step.features.get(self.name)
        if data is None:
            return
        device_ids, host_ids = data["store"]
        if device_ids:
            self.copier.store(device_ids, host_ids)
        host_ids, device_ids = data["load"]
        if host_ids:
            self.copier.load(host_ids, device_ids)

"""Disaggregated prefill/decode (`--kv-transfer-config '{"kv_connector": "TcpConnector", "kv_role": ...}'`): a
prefill instance (kv_producer) computes a prompt's KV and keeps its blocks for a decode instance (kv_consumer),
which fetches them over TCP (`transport.py`) and continues generation, as vLLM's pull-based connectors do. On one
host, `SharedMemoryConnector` moves them through shared memory instead (`shared_memory.py`): the producer writes
them out at once and frees its blocks, the consumer reads them in.

The proxy sends a request to the prefill instance with `kv_transfer_params: {"do_remote_decode": true}` and
max_tokens 1. When it finishes, the producer's scheduler hook holds the prompt's full blocks (those a decode
instance can use: all but the one holding the last prompt token, which the decode computes to get its logits) and
answers with where they wait: `do_remote_prefill`, `remote_request_id`, `remote_block_ids`, `remote_block_size`,
and `remote_host` and `remote_port` (TCP) or `remote_file` and `remote_lock` (shared memory). The proxy hands those
to the decode instance with the same request. The consumer's scheduler hook takes device blocks for the part its own
prefix cache lacks and holds the request back (`loads.py`) while its runner hook fetches them; once landed they are
prefix-cache hits. The producer frees its blocks once the consumer acknowledged them (TCP) or once written (shared
memory; the file goes at the consumer's read), or after `abort_timeout_s` (kv_connector_extra_config, default 120).
A fetch that fails (the producer restarted, timed out) is not fatal: the decode instance computes the prompt itself.

Step data (`features["kv_pd"]`): `hold` = {request id: its kv_transfer_params} and `drop` = [request ids] for the
producer's transport, `load` = [{request_id, block_ids, skip_blocks (held here already), and the remote_* fields of
its kv_transfer_params, remote_block_ids cut to the blocks to fetch}] for the consumer's. Result: `sent`, `loaded` =
request ids; `failed` = {request id: why}.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from loomserve.platform.config.kv_transfer import SHARED_MEMORY, TCP
from loomserve.platform.features import RunnerHook
from loomserve.platform.kv_transfer.copier import device_index, scatter_blocks
from loomserve.platform.kv_transfer.loads import BlockLoads
from loomserve.platform.kv_transfer.shared_memory import (
    DEFAULT_DIR,
    ProducerLock,
    SharedMemoryTransport,
    is_file_name,
    new_file_name,
)
from loomserve.platform.kv_transfer.transport import TcpTransport
from loomserve.platform.request import RequestStatus

if TYPE_CHECKING:
    from loomserve.platform.config import EngineConfig
    from loomserve.platform.config.kv_transfer import KVTransferConfig
    from loomserve.platform.kv_cache import KVBlock
    from loomserve.platform.request import Request
    from loomserve.platform.step import ScheduledStep

logger = logging.getLogger(__name__)

NAME = "kv_pd"
_IDLE_WAIT_S = 0.005  # how long a step with nothing to run waits for a transfer
_FETCH_TIMEOUT_S = 30.0


def _enabled(config: EngineConfig) -> KVTransferConfig | None:
    kt = config.kv_transfer_config
    return kt if kt is not None and kt.kv_connector in (TCP, SHARED_MEMORY) else None


def _abort_timeout_s(config: KVTransferConfig) -> float:
    """How long a producer keeps a finished prefill's KV for a decode instance."""
    return float(config.kv_connector_extra_config.get("abort_timeout_s", 120.0))


def _shared_directory(config: KVTransferConfig) -> str:
    return config.kv_connector_extra_config.get("shared_storage_path", DEFAULT_DIR)


def scheduler_hook(config: EngineConfig) -> DisaggScheduler | None:
    kt = _enabled(config)
    return DisaggScheduler(kt) if kt is not None else None


def runner_hook(config: EngineConfig, model: nn.Module, device: torch.device) -> DisaggWorker | None:
    kt = _enabled(config)
    return DisaggWorker(kt) if kt is not None else None


class DisaggScheduler(BlockLoads):
    name = NAME

    def __init__(self, config: KVTransferConfig) -> None:
        super().__init__()
        self.config = config
        self.engine_id = config.engine_id or uuid.uuid4().hex
        self.timeout_s = _abort_timeout_s(config)
        self.sending: dict[str, tuple[list[KVBlock], float]] = {}  # held for a decode instance: blocks, deadline
        self.to_hold: dict[str, dict[str, Any]] = {}
        self.to_drop: list[str] = []
        self.loads: list[dict[str, Any]] = []
        shared = config.kv_connector == SHARED_MEMORY and config.is_producer
        self.lock = ProducerLock(_shared_directory(config)) if shared else None  # held for the engine's life

    def busy(self) -> bool:
        """Blocks wait for a decode instance, or the block server has news to hear: keep stepping."""
        return bool(self.sending or self.to_hold or self.to_drop or self.loading)

    def begin_step(self, running: list[Request]) -> None:
        super().begin_step(running)
        now = time.monotonic()
        for request_id in [r for r, (_, deadline) in self.sending.items() if deadline < now]:
            logger.warning("no decode instance fetched the KV of %s within %.0f s: freeing it", request_id,
                           self.timeout_s)
            self._free(self.sending.pop(request_id)[0])
            self.to_drop.append(request_id)

    def admits(self, request: Request) -> bool:
        """A decode request waits while its prompt's blocks come from the prefill instance."""
        params = request.kv_transfer_params
        if not (self.config.is_consumer and params and params.get("do_remote_prefill")):
            return True
        if request.request_id in self.loading:
            return False
        if params.get("remote_block_size") != self.kv.block_size:
            logger.warning("%s: the prefill instance's KV blocks hold %s tokens, ours %d: computing the prompt here",
                           request.request_id, params.get("remote_block_size"), self.kv.block_size)
            request.kv_transfer_params = None
            return True
        if self.config.kv_connector == SHARED_MEMORY and not (is_file_name(params.get("remote_file"))
                                                              and is_file_name(params.get("remote_lock"))):
            logger.warning("%s: kv_transfer_params name no KV file a prefill instance wrote: computing the prompt here",
                           request.request_id)
            request.kv_transfer_params = None
            return True
        remote = params["remote_block_ids"]
        num_blocks = min(len(remote), self.kv.max_hit_blocks(request))
        on_device = self.kv.cached_prefix(request)[:num_blocks]
        # Even with nothing to fetch (our own prefix cache has it all) the fetch goes out: it tells the prefill
        # instance to let its blocks go now rather than at its timeout.
        if not self.has_room(request, on_device, num_blocks - len(on_device)):
            return False  # wait for room rather than compute what the prefill instance holds
        hashes = self.kv.block_hashes(request, num_blocks)[len(on_device) : num_blocks]
        block_ids = self.start_load(request, on_device, hashes)
        where = {k: v for k, v in params.items() if k.startswith("remote_")}
        self.loads.append({**where, "request_id": request.request_id, "block_ids": block_ids,
                           "remote_block_ids": remote[len(on_device) : num_blocks], "skip_blocks": len(on_device)})
        return False

    def release(self, request: Request) -> None:
        """A prefill for a decode instance finished: hold its prompt's blocks and say where they wait."""
        super().release(request)
        params = request.kv_transfer_params
        done = request.status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH)
        if self.config.is_producer and params and params.get("do_remote_decode") and done:
            self._hold_for_decode(request)

    def _hold_for_decode(self, request: Request) -> None:
        block_size = self.kv.block_size
        blocks = self.kv.blocks(request.request_id)[: (request.num_prompt_tokens - 1) // block_size]
        self.kv.pool.touch(blocks)
        block_ids = [b.block_id for b in blocks]
        self.sending[request.request_id] = (blocks, time.monotonic() + self.timeout_s)
        request.kv_transfer_params = {
            "do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": self.engine_id,
            "remote_request_id": request.request_id, "remote_block_ids": block_ids, "remote_block_size": block_size,
            **self._where(),
        }
        self.to_hold[request.request_id] = request.kv_transfer_params

    def _where(self) -> dict[str, Any]:
        """Where a consumer finds a request's blocks."""
        if self.config.kv_connector == SHARED_MEMORY:
            return {"remote_file": new_file_name(), "remote_lock": self.lock.name}
        return {"remote_host": self.config.kv_ip, "remote_port": self.config.kv_port}

    def step_data(self, running: list[Request]) -> dict[str, Any] | None:
        if not (self.to_hold or self.to_drop or self.loads):
            return None
        data = {"hold": self.to_hold, "drop": self.to_drop, "load": self.loads}
        self.to_hold, self.to_drop, self.loads = {}, [], []
        return data

    def update(self, result: dict[str, Any], requests: dict[str, Request]) -> dict[str, str]:
        for request_id in result["sent"]:
            blocks, _ = self.sending.pop(request_id, ([], 0.0))
            self._free(blocks)
        for request_id in result["loaded"]:
            self._landed(request_id, True, requests)
        for request_id, why in result["failed"].items():
            logger.warning("fetching the KV of %s failed (%s): computing its prompt here", request_id, why)
            self._landed(request_id, False, requests)
        return {}

    def _landed(self, request_id: str, ok: bool, requests: dict[str, Request]) -> None:
        self.land(request_id, ok)
        request = requests.get(request_id)
        if request is not None:
            request.kv_transfer_params = None  # served (or given up): it starts from its prefix cache now


class DisaggWorker(RunnerHook):
    name = NAME

    def __init__(self, config: KVTransferConfig) -> None:
        self.config = config
        self.caches: list[torch.Tensor] = []
        self.transport = _transport(config)
        self.fetcher = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="loomserve-kv-fetch")
        self.fetches: dict[str, tuple[list[int], concurrent.futures.Future]] = {}

    def register_kv_caches(self, kv_caches: list[torch.Tensor]) -> None:
        self.caches = kv_caches
        self.transport.register_kv_caches(kv_caches)

    def begin_step(self, step: ScheduledStep) -> None:
        data = step.features.get(self.name)
        if data is not None:
            if data["hold"] or data["drop"]:
                self.transport.hold(data["hold"], data["drop"])
            for load in data["load"]:
                future = self.fetcher.submit(self.transport.fetch, load, _FETCH_TIMEOUT_S)
                self.fetches[load["request_id"]] = (load["block_ids"], future)
        if not step.scheduled:  # a step only to hear of transfers: give them a moment instead of spinning
            futures = [f for _, f in self.fetches.values()]
            if futures:
                concurrent.futures.wait(futures, _IDLE_WAIT_S, concurrent.futures.FIRST_COMPLETED)
            else:
                time.sleep(_IDLE_WAIT_S)

    def result(self) -> dict[str, Any] | None:
        loaded, failed = [], {}
        for request_id, (block_ids, future) in list(self.fetches.items()):
            if not future.done():
                continue
            del self.fetches[request_id]
            try:
                blocks = future.result()
            except OSError as e:  # ConnectionError included: refused, reset, or the producer no longer holds them
                failed[request_id] = str(e) or type(e).__name__
                continue
            device = self.caches[0].device
            scatter_blocks(self.caches, blocks.to(device, self.caches[0].dtype), device_index(block_ids, device))
            loaded.append(request_id)
        sent = self.transport.take_sent()
        if not (loaded or failed or sent):
            return None
        return {"sent": sent, "loaded": loaded, "failed": failed}


def _transport(config: KVTransferConfig) -> TcpTransport | SharedMemoryTransport:
    if config.kv_connector == SHARED_MEMORY:
        return SharedMemoryTransport(_shared_directory(config), _abort_timeout_s(config))
    return TcpTransport(config.kv_ip, config.kv_port, serves=config.is_producer)

"""Which waiting requests may start, so that at most `max_loras` distinct adapters run at once, none starves.

A running request holds its adapter's slot until it finishes or is preempted, so the running requests'
adapters are the adapters of any step. A waiting request may start when its adapter already runs or a
slot is free, and once its weights are in host memory (else a background load starts and the request
waits, without holding up the requests behind it). When a request finds every slot taken, the running
adapter with the fewest requests is drained: it admits no new requests until its running ones finish,
which frees its slot for the oldest blocked request. Requests of other running adapters keep starting.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from loomserve.adapters.request import LoRARequest
from loomserve.platform.features import SchedulerHook
from loomserve.platform.request import Request

logger = logging.getLogger(__name__)


class LoRAAdmission(SchedulerHook):
    """The LoRA feature's scheduler hook. Its step data names the running requests' adapters (`active`: the runner
    keeps them in slots and host memory) and the adapters to read from disk (`load`); the runner hook answers with
    the adapters in its host cache (`cached`) and the loads that failed (`failed`: id -> why)."""

    name = "lora"

    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self.cached: set[int] = set()  # adapters the runner holds in host memory, as of its last result
        self.to_load: dict[int, LoRARequest] = {}  # asked for this step
        self.draining: int | None = None
        self.running: Counter[int] = Counter()

    def begin_step(self, running: list[Request]) -> None:
        """Count the running requests per adapter before a step's admissions."""
        self.running = Counter(r.lora_request.lora_int_id for r in running if r.lora_request is not None)
        if self.draining not in self.running:
            self.draining = None

    def admits(self, request: Request) -> bool:
        """Whether `request` may start now; a True counts it as running for the rest of the step."""
        lora = request.lora_request
        if lora is None:
            return True
        lora_id = lora.lora_int_id
        if lora_id == self.draining:
            return False
        if lora_id not in self.running and len(self.running) >= self.max_loras:
            if self.draining is None:
                self.draining = min(self.running, key=lambda i: (self.running[i], i))
            return False
        if lora_id not in self.cached:
            self.to_load[lora_id] = lora  # the runner starts reading it (once) and reports it cached when done
            return False
        self.running[lora_id] += 1
        return True

    def step_data(self, running: list[Request]) -> dict[str, list[list]]:
        active = {r.lora_request.lora_int_id: r.lora_request for r in running if r.lora_request is not None}
        data = {"active": [a.to_wire() for a in active.values()], "load": [a.to_wire() for a in self.to_load.values()]}
        self.to_load = {}
        return data

    def update(self, result: dict[str, Any], requests: dict[str, Request]) -> dict[str, str]:
        """Take in the runner's host cache; the requests of adapters that failed to load end with the reason."""
        self.cached = set(result["cached"])
        if not result["failed"]:
            return {}
        failed = {int(lora_id): reason for lora_id, reason in result["failed"].items()}
        for lora_id, reason in failed.items():
            logger.error("aborting the requests of LoRA adapter %d: %s", lora_id, reason)
        return {request_id: failed[r.lora_request.lora_int_id] for request_id, r in requests.items()
                if r.lora_request is not None and r.lora_request.lora_int_id in failed}

"""Which waiting requests may start, so that at most `max_loras` distinct adapters run at once, none starves.

A running request holds its adapter's slot until it finishes or is preempted, so the running requests'
adapters are the adapters of any step. A waiting request may start when its adapter already runs or a
slot is free, and once its weights are in host memory (else a background load starts and the request
waits, without holding up the requests behind it). When a request finds every slot taken, the running
adapter with the fewest requests is drained: it admits no new requests until its running ones finish,
which frees its slot for the oldest blocked request. Requests of other running adapters keep starting.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from loomserve.adapters.request import LoRARequest
from loomserve.platform.request import Request


class LoRAAdmission:
    def __init__(self, max_loras: int, ready: Callable[[LoRARequest], bool]) -> None:
        self.max_loras = max_loras
        self.ready = ready  # True once the adapter's weights are at hand; else starts loading them
        self.draining: int | None = None
        self.running: Counter[int] = Counter()

    def begin(self, running: list[Request]) -> None:
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
        if not self.ready(lora):
            return False
        self.running[lora_id] += 1
        return True

    def active(self, running: list[Request]) -> dict[int, LoRARequest]:
        """The adapters of the running requests: they keep their slots and host copies."""
        return {r.lora_request.lora_int_id: r.lora_request for r in running if r.lora_request is not None}

"""The async front end's pending pooling requests: each awaits its one engine output."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from loomserve.platform.messages import EngineCoreOutput
from loomserve.platform.stats import FinishedRequestStats, IterationStats
from loomserve.pooling.outputs import PoolingOutput, PoolingRequestOutput


@dataclass
class _Pending:
    future: asyncio.Future
    prompt_token_ids: list[int]
    arrival_time: float
    scheduled_time: float | None = None


class PoolingTracker:
    def __init__(self) -> None:
        self.pending: dict[str, _Pending] = {}

    def add(self, request_id: str, prompt_token_ids: list[int]) -> asyncio.Future:
        if request_id in self.pending:
            raise ValueError(f"request id {request_id!r} is already in use")
        future = asyncio.get_running_loop().create_future()
        self.pending[request_id] = _Pending(future, prompt_token_ids, time.time())
        return future

    def process(self, outputs: list[EngineCoreOutput],
                first_scheduled: dict[str, float] | None = None) -> IterationStats | None:
        """Resolve the requests these outputs finish; what they cost, or None when none was a pooling output.
        `first_scheduled`: request id -> when the engine first scheduled it."""
        stats = None
        now = time.time()
        for request_id, scheduled in (first_scheduled or {}).items():
            if request_id in self.pending:
                self.pending[request_id].scheduled_time = scheduled
        for out in outputs:
            pending = self.pending.pop(out.request_id, None) if out.pooled is not None else None
            if pending is None:
                continue
            data = out.pooled
            if not pending.future.done():
                pending.future.set_result(PoolingRequestOutput(out.request_id, PoolingOutput(data),
                                                               pending.prompt_token_ids,
                                                               num_cached_tokens=out.num_cached_tokens))
            stats = stats or IterationStats()
            stats.num_prompt_tokens += len(pending.prompt_token_ids)
            stats.e2e_latencies.append(now - pending.arrival_time)
            stats.finished_reasons.append(out.finish_reason or "stop")
            stats.finished_requests.append(FinishedRequestStats.timed(
                out.finish_reason or "stop", pending.arrival_time, pending.scheduled_time, now, None, now,
                num_prompt_tokens=len(pending.prompt_token_ids), num_generation_tokens=0, max_num_generation_tokens=0,
            ))
        return stats

    def forget(self, request_id: str) -> bool:
        """Drop a request that will not be awaited any more; True if the engine may still be running it."""
        return self.pending.pop(request_id, None) is not None

    def fail_all(self, exc: Exception) -> None:
        for pending in self.pending.values():
            if not pending.future.done():
                pending.future.set_exception(exc)
        self.pending.clear()

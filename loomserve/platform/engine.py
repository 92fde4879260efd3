"""EngineCore: the schedule -> run -> update loop, and the process that runs it behind ZeroMQ.

In the server, EngineCore lives in its own process: its front ends (one per API process) send declared messages
(add, abort, calls) to one ROUTER socket and read their requests' outputs from it (`engine_clients.py`), so
tokenization, detokenization and HTTP never compete with the model for the GIL.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import shutil
import signal
import traceback
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from loomserve.modalities.sent_items import MediaReceivers
from loomserve.platform.config import EngineArgs, EngineConfig, resolve_device
from loomserve.platform.executor import Executor, create_executor
from loomserve.platform.features import scheduler_hooks
from loomserve.platform.gc_heap import freeze_startup_heap
from loomserve.platform.logs import configure_logging
from loomserve.platform.messages import (
    Abort,
    CallReply,
    EngineCall,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineFailed,
    Ping,
    Ready,
    ResetPrefixCache,
    Shutdown,
    pack,
)
from loomserve.platform.parent_watch import exit_with_parent
from loomserve.platform.request import Request, RequestStatus
from loomserve.platform.scheduler import Scheduler
from loomserve.platform.step import ScheduledStep, StepResult
from loomserve.platform.threads import apply_engine_threads

if TYPE_CHECKING:
    from loomserve.adapters.request import LoRARequest
    from loomserve.platform.engine_clients import EngineClients

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig, executor: Executor | None = None) -> None:
        self.config = config
        self.executor = executor or create_executor(config)
        num_blocks = self.executor.measure_kv_blocks()
        block_size, max_model_len = config.cache_config.block_size, config.model_config.max_model_len
        if num_blocks * block_size < max_model_len:
            raise ValueError(
                f"max_model_len {max_model_len} is larger than the {num_blocks * block_size} tokens the KV cache can "
                "hold: give it more memory (--kv-cache-memory, --gpu-memory-utilization) or lower --max-model-len"
            )
        self.executor.init_kv_cache(num_blocks)
        self.scheduler = Scheduler(config.scheduler_config, config.cache_config, max_model_len, num_blocks,
                                   scheduler_hooks(config), uses_kv_cache=not config.model_config.encoder_only)
        self.in_flight: tuple[ScheduledStep, Any] | None = None  # launched, not yet landed
        self.late_step_data = getattr(self.executor, "calls_back", False)
        if self.late_step_data:
            for hook in self.scheduler.hooks:
                hook.allow_late_step_data()
        # Front-end calls answered once done: (call id, the feature called or None, its future).
        self.pending_calls: list[tuple[int, str | None, concurrent.futures.Future]] = []

    def add_request(self, req: EngineCoreRequest) -> None:
        request = Request(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            sampling_params=req.sampling_params,
            eos_token_id=req.eos_token_id,
            arrival_time=req.arrival_time,
            cache_salt=req.cache_salt,
            lora_request=req.lora_request,
            mm_items=req.mm_items,
            pooling_params=req.pooling_params,
            kv_transfer_params=req.kv_transfer_params,
        )
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_requests(self) -> bool:
        return self.scheduler.has_requests() or self.in_flight is not None

    def step(self) -> EngineCoreOutputs:
        """One iteration: schedule, launch, and land a step's tokens and pooled outputs.

        With async scheduling the next step is scheduled and launched before the previous step's tokens are
        landed, so the host's bookkeeping overlaps the device's work; a request whose sampling reads its own
        tokens (penalties, min_tokens) makes the engine land every step before scheduling the next. A step with
        no tokens still goes to the runner: it carries the features' data (adapters to load) and finished ids.
        """
        ahead = self.config.async_scheduling and self.scheduler.can_run_ahead()
        outputs = []
        if not ahead and self.in_flight is not None:
            outputs += self._land(*self.in_flight)
            self.in_flight = None
        step = self.scheduler.schedule()
        launched = None
        if self.scheduler.has_requests() or not step.is_empty:
            if self.late_step_data:
                launched = (step, self.executor.launch(step, lambda: self._before_sample(step, outputs)))
            else:
                launched = (step, self.executor.launch(step))
        if self.in_flight is not None:
            outputs += self._land(*self.in_flight)
        self.in_flight = launched
        if not ahead and self.in_flight is not None:
            outputs += self._land(*self.in_flight)
            self.in_flight = None
        return EngineCoreOutputs(outputs, self.scheduler.stats())

    def _before_sample(self, step: ScheduledStep, outputs: list[EngineCoreOutput]) -> None:
        """While the step's forward runs: land the step before (its tokens are what the features' late data
        needs), then add that data to the step."""
        if self.in_flight is not None:
            outputs += self._land(*self.in_flight)
            self.in_flight = None
        for hook in self.scheduler.hooks:
            data = hook.late_step_data()
            if data is not None:
                step.features[hook.name] = data

    def _land(self, step: ScheduledStep, handle: Any) -> list[EngineCoreOutput]:
        """Hand a launched step's sampled tokens and pooled outputs to the scheduler, and its features' results to
        their hooks; one output per request that got tokens, its pooled output or an end, in step order."""
        result = self.executor.collect(handle)
        updated = self.scheduler.update_from_output(step, result)
        refused = self.scheduler.update_features(result)
        outputs = [_output(r, taken, result) for r, taken in updated]
        return outputs + [EngineCoreOutput(r.request_id, [], finish_reason=r.finish_reason) for r in refused]

    def reset_prefix_cache(self) -> None:
        self.scheduler.kv.pool.reset_prefix_cache()

    def _take_call_result(self, feature: str, future: concurrent.futures.Future) -> None:
        """What a done call to a feature's runner hook answered is that feature's result, for its scheduler hook
        (taken on the engine's thread)."""
        if future.exception() is None and future.result() is not None:
            self.scheduler.update_features(StepResult(features={feature: future.result()}))

    def _call_now(self, feature: str, method: str, *args: Any) -> None:
        future = self.executor.call(feature, method, *args)
        future.result()  # raises the call's ValueError
        self._take_call_result(feature, future)

    def add_lora(self, lora: LoRARequest) -> None:
        """Load an adapter now (the offline API); raises ValueError saying why it cannot be served."""
        self._call_now("lora", "add", lora.to_wire())

    def remove_lora(self, lora_id: int) -> None:
        self._call_now("lora", "remove", lora_id)

    def call(self, call: EngineCall) -> None:
        """A front-end call; its reply comes out of `take_call_replies` once done. Calls that are a feature's go to
        its runner hook."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if isinstance(call, ResetPrefixCache):
            self.reset_prefix_cache()
            future.set_result(None)
            feature = None
        else:
            feature = call.feature
            future = self.executor.call(feature, call.method, *call.args())
        self.pending_calls.append((call.call_id, feature, future))

    def take_call_replies(self) -> list[CallReply]:
        """A reply for each call that has finished (with why, if it failed)."""
        done, waiting = [], []
        for call in self.pending_calls:  # one look at each future: one that ends meanwhile is answered next time
            (done if call[2].done() else waiting).append(call)
        self.pending_calls = waiting
        for _, feature, future in done:
            if feature is not None:
                self._take_call_result(feature, future)
        return [CallReply(call_id, None if f.exception() is None else str(f.exception())) for call_id, _, f in done]

    def shutdown(self) -> None:
        self.executor.shutdown()


def _output(request: Request, taken: int, result: StepResult) -> EngineCoreOutput:
    """What a landed step gave a request: its new tokens (and logprobs), or, for a pooling request, its pooled
    output and no tokens."""
    if request.pooling_params is not None:
        return EngineCoreOutput(request.request_id, [], finish_reason=request.finish_reason,
                                num_cached_tokens=request.num_cached_tokens,
                                pooled=result.pooled[request.request_id])
    logprobs = result.logprobs.get(request.request_id)
    return EngineCoreOutput(
        request_id=request.request_id,
        new_token_ids=request.output_token_ids[len(request.output_token_ids) - taken:],
        new_logprobs=logprobs[:taken] if logprobs is not None else None,
        prompt_logprobs=result.prompt_logprobs.get(request.request_id),
        finish_reason=request.finish_reason,
        stop_reason=request.stop_reason,
        num_cached_tokens=request.num_cached_tokens,
        kv_transfer_params=request.kv_transfer_params if request.status.finished else None,
    )


def run_engine_core(args: EngineArgs, address: str, started: Connection) -> None:
    """Entry point of the engine process: build the engine, tell the process that started it (`started`: Ready or
    EngineFailed), then serve its clients at `address` until told to stop."""
    import zmq  # the in-process engine (LLM) needs no ZeroMQ

    from loomserve.platform.engine_clients import EngineClients

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the front end stops the engine
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked while starting; a pending one is dropped
    configure_logging("[engine]")
    ipc_dir = os.path.dirname(address.removeprefix("ipc://"))
    exit_with_parent(lambda: shutil.rmtree(ipc_dir, ignore_errors=True))
    _set_engine_threads(args)
    ctx = zmq.Context()
    clients = EngineClients(ctx, address)
    try:
        try:
            engine = EngineCore(args.create_engine_config())
        except Exception:  # the starter must learn why the engine died, not just that it did, and tells the user
            started.send_bytes(pack(EngineFailed(traceback.format_exc())))
            raise SystemExit(1) from None
        freeze_startup_heap()
        started.send_bytes(pack(Ready()))
        try:
            _serve(engine, clients)
        except Exception:  # every front end reports why to its users
            clients.broadcast(EngineFailed(traceback.format_exc()))
            raise SystemExit(1) from None
        finally:
            engine.shutdown()
    finally:
        clients.close()
        ctx.term()
def _set_engine_threads(args: EngineArgs) -> None:
    """On CPU, the thread policy (platform/threads.py) with one core left to the front end (HTTP, tokenizer): an
    OpenMP thread waiting for a busy core stalls every op of a step (measured: 11 -> 130 embedding requests/s on 2
    cores, benchmarks/RESULTS.md)."""
    if resolve_device(args.device).type == "cpu":
        threads = apply_engine_threads(args.cpu_threads, front_end_cores=1)
        logger.info("%s: %d CPU thread(s), OMP_WAIT_POLICY=%s", args.served_model_names()[0], threads,
                    os.environ.get("OMP_WAIT_POLICY"))


def _serve(engine: EngineCore, clients: EngineClients) -> None:
    import zmq

    poller = zmq.Poller()
    poller.register(clients.socket, zmq.POLLIN)
    media = MediaReceivers(engine.config.mm_config.processor_cache_bytes)  # items sent once (sent_items.py)
    while True:
        # Block while idle; with work in hand, only drain what has already arrived; poll while calls run.
        timeout = 0 if engine.has_requests() else (5 if engine.pending_calls else None)
        heard: list[bytes] = []  # clients that sent something this round
        while dict(poller.poll(timeout)).get(clients.socket):
            client, message = clients.receive()
            if client not in heard:
                heard.append(client)
            if isinstance(message, EngineCoreRequest):
                engine.add_request(media.restore(message))
            elif isinstance(message, Abort):
                engine.abort_requests(message.request_ids)
            elif isinstance(message, Shutdown):
                return
            elif not isinstance(message, Ping):  # a ping is answered by the report this loop sends below
                call = clients.take_call(client, message)
                if call is not None:
                    engine.call(call)
            timeout = 0
        for reply in engine.take_call_replies():
            clients.reply(reply)
        if engine.has_requests():
            clients.send_step(engine.step())
        elif not timeout:  # what arrived (aborts, pings) left the engine idle: report the now-empty state once
            clients.send_report(engine.scheduler.stats(), heard)

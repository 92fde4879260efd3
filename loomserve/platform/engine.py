"""EngineCore: the schedule -> run -> update loop, and the process that runs it behind ZeroMQ.

In the server, EngineCore lives in its own process: the front end sends msgpack messages (add,
abort) over a PUSH socket and reads batches of outputs from a PULL socket, so tokenization,
detokenization and HTTP never compete with the model for the GIL.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import traceback
from typing import TYPE_CHECKING, Any

import torch

from loomserve.adapters.request import LoRARequest
from loomserve.adapters.scheduling import LoRAAdmission
from loomserve.modalities.encoder_cache import EncoderCacheManager
from loomserve.platform.config import EngineArgs, EngineConfig, resolve_device
from loomserve.platform.gc_heap import freeze_startup_heap
from loomserve.platform.messages import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    MessageType,
    pack,
    unpack,
)
from loomserve.platform.request import Request, RequestStatus
from loomserve.platform.runner import InFlightStep, ModelRunner, StepOutput
from loomserve.platform.scheduler import Scheduler, SchedulerOutput
from loomserve.pooling.wire import tensor_to_wire

if TYPE_CHECKING:
    from loomserve.adapters.manager import LoRAManager

logger = logging.getLogger(__name__)

_LORA_WAIT_S = 0.005  # how long a step with nothing to run waits for an adapter to finish loading


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.runner = ModelRunner(config)
        self.lora_manager = self.runner.lora_manager
        admission = None
        if self.lora_manager is not None:
            admission = LoRAAdmission(config.lora_config.max_loras, self.lora_manager.ready)
        encoder_cache = EncoderCacheManager.for_engine(config) if self.runner.mm is not None else None
        self.scheduler = Scheduler(
            config.scheduler_config, config.cache_config, config.model_config.max_model_len,
            lora_admission=admission, encoder_cache=encoder_cache,
        )
        self.in_flight: tuple[SchedulerOutput, InFlightStep | None] | None = None  # launched, not yet landed
        self.utility_calls: list[tuple[int, concurrent.futures.Future]] = []  # calls answered once done

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
        )
        if request.lora_request is not None:
            self._loras()  # refuses adapter requests when LoRA is off
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)
        self.runner.release(request_ids)

    def has_requests(self) -> bool:
        return self.scheduler.has_requests() or self.in_flight is not None

    def step(self) -> EngineCoreOutputs:
        """One iteration: schedule, launch, and land a step's tokens and pooled outputs.

        With async scheduling the next step is scheduled and launched before the previous step's tokens are
        landed, so the host's bookkeeping overlaps the device's work; a request whose sampling reads its own
        tokens (penalties, min_tokens) makes the engine land every step before scheduling the next.
        """
        ahead = self.config.async_scheduling and self.scheduler.can_run_ahead()
        outputs = self._abort_unloadable()
        if not ahead and self.in_flight is not None:
            outputs += self._land(*self.in_flight)
            self.in_flight = None
        out = self.scheduler.schedule()
        self.runner.release(out.preempted_ids)
        launched = (out, self.runner.launch(out)) if out.scheduled else None
        if launched is None and self.in_flight is None and self.lora_manager is not None:
            self.lora_manager.wait(_LORA_WAIT_S)  # nothing to run but adapters still loading
        if self.in_flight is not None:
            outputs += self._land(*self.in_flight)
        self.in_flight = launched
        if not ahead and self.in_flight is not None:
            outputs += self._land(*self.in_flight)
            self.in_flight = None
        return EngineCoreOutputs(outputs, self.scheduler.stats())

    def _land(self, out: SchedulerOutput, step: InFlightStep | None) -> list[EngineCoreOutput]:
        """Hand a launched step's sampled tokens and pooled outputs to the scheduler; one output per request that
        got either, in step order."""
        result = self.runner.collect(step)
        updated = self.scheduler.update_from_output(out, result.sampled)
        self.runner.release([r.request_id for r in updated if r.status.finished])
        return [_output(r, result) for r in updated]

    def reset_prefix_cache(self) -> None:
        self.scheduler.kv.pool.reset_prefix_cache()

    # ------------------------------------------------------------------ LoRA adapters

    def _loras(self) -> LoRAManager:
        """The adapter manager; ValueError when LoRA is off."""
        if self.lora_manager is None:
            raise ValueError("LoRA is not enabled: start the engine with enable_lora=True (--enable-lora)")
        return self.lora_manager

    def add_lora(self, lora: LoRARequest) -> None:
        """Load an adapter now (the offline API); raises ValueError saying why it cannot be served."""
        self._loras().add(lora)

    def remove_lora(self, lora_id: int) -> None:
        self._loras().remove(lora_id)

    def call_utility(self, call: list) -> None:
        """A front-end call [method, call id, *args]; its reply comes out of `take_utility_replies`."""
        method, call_id, *args = call
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            if method == "add_lora":
                future = self._loras().start_add(LoRARequest.from_wire(args[0]))
            elif method == "remove_lora":
                self.remove_lora(args[0])
                future.set_result(None)
            elif method == "reset_prefix_cache":
                self.reset_prefix_cache()
                future.set_result(None)
            else:
                raise ValueError(f"unknown engine call {method!r}")
        except ValueError as e:
            future.set_exception(e)
        self.utility_calls.append((call_id, future))

    def take_utility_replies(self) -> list[list]:
        """[call id, error message or None] for each call that has finished."""
        done = [(call_id, f) for call_id, f in self.utility_calls if f.done()]
        self.utility_calls = [(call_id, f) for call_id, f in self.utility_calls if not f.done()]
        return [[call_id, None if f.exception() is None else str(f.exception())] for call_id, f in done]

    def _abort_unloadable(self) -> list[EngineCoreOutput]:
        """End the requests of adapters that failed to load from disk (e.g. their folder went away)."""
        failures = self.lora_manager.take_failures() if self.lora_manager is not None else {}
        if not failures:
            return []
        ids = [r.request_id for r in self.scheduler.requests.values()
               if r.lora_request is not None and r.lora_request.lora_int_id in failures]
        for lora_id, reason in failures.items():
            logger.error("aborting the requests of LoRA adapter %d: %s", lora_id, reason)
        finished = self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
        self.runner.release([r.request_id for r in finished])
        return [EngineCoreOutput(r.request_id, [], finish_reason=r.finish_reason) for r in finished]


def _output(request: Request, result: StepOutput) -> EngineCoreOutput:
    """What a landed step gave a request: its new token (and logprobs), or, for a pooling request, its pooled
    output and no tokens."""
    if request.pooling_params is not None:
        return EngineCoreOutput(request.request_id, [], finish_reason=request.finish_reason,
                                num_cached_tokens=request.num_cached_tokens,
                                pooled=tensor_to_wire(result.pooled[request.request_id]))
    return EngineCoreOutput(
        request_id=request.request_id,
        new_token_ids=[request.output_token_ids[-1]],
        new_logprobs=[result.logprobs[request.request_id]] if request.request_id in result.logprobs else None,
        finish_reason=request.finish_reason,
        stop_reason=request.stop_reason,
        num_cached_tokens=request.num_cached_tokens,
    )


def run_engine_core(args: EngineArgs, input_addr: str, output_addr: str) -> None:
    """Entry point of the engine process: build the engine, say READY, then serve until told to stop."""
    import zmq  # the in-process engine (LLM) needs no ZeroMQ

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [engine] %(message)s")
    _leave_a_core_to_the_front_end(args)
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.connect(input_addr)
    outbox = ctx.socket(zmq.PUSH)
    outbox.connect(output_addr)
    try:
        engine = EngineCore(args.create_engine_config())
        freeze_startup_heap()
        cc = engine.config.cache_config
        outbox.send(pack(MessageType.READY, {"num_blocks": cc.num_blocks, "block_size": cc.block_size}))
        _serve(engine, inbox, outbox)
    except Exception:  # the front end must learn why the engine died, not just that it did
        outbox.send(pack(MessageType.ERROR, traceback.format_exc()))
        raise
    finally:
        inbox.close(linger=0)
        outbox.close(linger=1000)
        ctx.term()


def _leave_a_core_to_the_front_end(args: EngineArgs) -> None:
    """On CPU, unless OMP_NUM_THREADS says otherwise, use one thread fewer than torch would: the front end (HTTP,
    tokenizer) runs beside the engine, and an OpenMP thread waiting for a busy core stalls every op of a step
    (measured: 11 -> 130 embedding requests/s on 2 cores, benchmarks/RESULTS.md)."""
    if resolve_device(args.device).type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, torch.get_num_threads() - 1))


def _serve(engine: EngineCore, inbox: Any, outbox: Any) -> None:
    import zmq

    poller = zmq.Poller()
    poller.register(inbox, zmq.POLLIN)
    while True:
        # Block while idle; with work in hand, only drain what has already arrived; poll while calls run.
        timeout = 0 if engine.has_requests() else (5 if engine.utility_calls else None)
        while dict(poller.poll(timeout)).get(inbox):
            kind, payload = unpack(inbox.recv())
            if kind == MessageType.ADD:
                engine.add_request(EngineCoreRequest.from_wire(payload))
            elif kind == MessageType.ABORT:
                engine.abort_requests(payload)
            elif kind == MessageType.UTILITY and payload == "shutdown":
                return
            elif kind == MessageType.UTILITY and isinstance(payload, list):
                engine.call_utility(payload)
            timeout = 0
        for reply in engine.take_utility_replies():
            outbox.send(pack(MessageType.UTILITY, reply))
        if engine.has_requests():
            outputs = engine.step()
        elif timeout:  # woke up only to check on the calls: nothing new to report
            continue
        else:  # what arrived (aborts) left the engine idle: report the now-empty state once
            outputs = EngineCoreOutputs([], engine.scheduler.stats())
        outbox.send(pack(MessageType.OUTPUTS, outputs.to_wire()))

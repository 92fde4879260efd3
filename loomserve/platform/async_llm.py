"""AsyncLLM: the server's client of the EngineCores running in their own processes.

The front end owns tokenization, detokenization, stop strings and metrics; an engine process owns a model replica.
They talk over ZeroMQ (a DEALER here, the engine's ROUTER there, over ipc sockets) with the declared messages of
`messages.py`. With data parallelism (`data_parallel_size` N) there are N engines: each request goes to the one the
router picks (`dp_router.py`), aborts and engine calls (adapters, prefix-cache resets) go to all of them.

An AsyncLLM either starts its engines (one API process: it owns them) or joins engines another process started (one
of several API processes, `EngineLink`): then the engines route each request's outputs back to the process that
sent it, and their adapter table (`LoRATable`) keeps every process's adapters the same.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

import zmq
import zmq.asyncio

from loomserve.adapters.registry import LoRARegistry
from loomserve.adapters.request import LoRARequest
from loomserve.modalities.inputs import MultiModalItem
from loomserve.modalities.sent_items import media_senders
from loomserve.platform.config import EngineArgs
from loomserve.platform.dp_router import DPRouter
from loomserve.platform.engine_group import EngineGroup, EngineLink
from loomserve.platform.input_processor import InputProcessor, load_tokenizer
from loomserve.platform.messages import (
    Abort,
    AddLoRA,
    CallReply,
    EngineCall,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineFailed,
    LoRATable,
    Ping,
    RefreshLoRAs,
    RemoveLoRA,
    ResetPrefixCache,
    pack,
    unpack,
)
from loomserve.platform.output_collector import OutputCollector
from loomserve.platform.output_processor import OutputProcessor
from loomserve.platform.request import RequestOutput, SamplingParams
from loomserve.platform.stats import IterationStats, SchedulerStats
from loomserve.pooling.inputs import PoolingInputs
from loomserve.pooling.outputs import PoolingOutput, PoolingRequestOutput
from loomserve.pooling.params import PoolingParams
from loomserve.pooling.tracker import PoolingTracker

logger = logging.getLogger(__name__)

_PING_INTERVAL_MS = 1000  # a quiet engine is pinged this often


class EngineDeadError(RuntimeError):
    pass


class StatLogger(Protocol):
    def record(self, scheduler_stats: SchedulerStats | None, iteration_stats: IterationStats | None) -> None: ...


class AsyncLLM:
    def __init__(self, args: EngineArgs, stat_loggers: list[StatLogger] | None = None,
                 log_requests: bool = False, link: EngineLink | None = None) -> None:
        """Start the engines of `args` (blocks until they have loaded the model), or join those of `link`."""
        config = args.create_engine_config()
        self.log_requests = log_requests  # one log line per request as it arrives (--enable-log-requests)
        self.model_config = config.model_config
        self.tokenizer = load_tokenizer(self.model_config)
        self.input_processor = InputProcessor(self.model_config, self.tokenizer, config.mm_config)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.pooling_inputs = PoolingInputs(config, self.tokenizer)
        self.pooling = PoolingTracker()
        self.stat_loggers = list(stat_loggers or [])
        self.errored: str | None = None
        self._output_task: asyncio.Task | None = None
        self._calls: dict[int, asyncio.Future] = {}  # engine calls awaiting their reply
        self.last_heard = 0.0  # time.monotonic() the engine last sent anything (outputs each step, pings when idle)
        self._call_ids = itertools.count()
        num_engines = config.parallel_config.data_parallel_size
        self._group = EngineGroup(args, num_engines) if link is None else None  # the engines this process owns
        if self._group is not None:
            self._group.wait_ready()
            link = EngineLink(self._group.addresses)
        self._link = link
        self.joined = link.num_clients > 1  # one of several API processes, on engines another process started
        self.loras = LoRARegistry(args.enable_lora, self.model_config.served_model_name, link.client_index,
                                  link.num_clients)
        self._ctx = zmq.asyncio.Context()
        self._sockets = [self._connect(address, link.client_index) for address in link.addresses.addresses]
        routing = config.parallel_config.data_parallel_routing
        self._router = DPRouter(num_engines, config.cache_config.block_size, routing) if num_engines > 1 else None
        self._call_replies: dict[int, list[str | None]] = {}  # engine call -> the engines' replies so far
        self._latest_stats = [SchedulerStats() for _ in self._sockets]  # each engine's last report (DP gauges)
        self._media_senders = media_senders(config, self.input_processor.mm, num_engines)
        for sock in self._sockets:  # the engines know this client from now on: adapter tables reach it
            zmq.Socket.shadow(sock.underlying).send(pack(Ping()))  # plain: no event loop runs here yet

    def _connect(self, address: str, client_index: int) -> zmq.asyncio.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, str(client_index).encode())  # the engines route this client's outputs by it
        sock.setsockopt(zmq.RCVHWM, 0)  # with the engine's unbounded send side: outputs queue here, never dropped
        sock.connect(address)
        return sock

    @classmethod
    def from_engine_args(cls, args: EngineArgs, stat_loggers: list[StatLogger] | None = None) -> AsyncLLM:
        return cls(args, stat_loggers)

    async def generate(
        self,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        request_id: str,
        prompt: str | None = None,
        mm_items: list[MultiModalItem] | None = None,
        lora_request: LoRARequest | None = None,
        kv_transfer_params: dict[str, Any] | None = None,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream cumulative outputs of one request; leaving early aborts it in the engine. `kv_transfer_params`:
        a disaggregated prefill/decode request's orders to the KV connector (the proxy's)."""
        self._ensure_output_task()
        if self.errored:
            raise EngineDeadError(self.errored)
        self.input_processor.validate(prompt_token_ids, sampling_params, mm_items or ())
        if self.log_requests:
            logger.info("Received request %s: %d prompt tokens, %r, adapter %s", request_id, len(prompt_token_ids),
                        sampling_params, lora_request.lora_name if lora_request else None)
        collector = OutputCollector()
        children = self.output_processor.add_request(
            request_id, prompt, prompt_token_ids, sampling_params, time.time(), collector
        )
        engine = None
        for child_id, params in children:
            request = self.input_processor.engine_request(
                child_id, prompt_token_ids, params, mm_items=mm_items or (), lora_request=lora_request,
                cache_salt=cache_salt,
            )
            request.kv_transfer_params = kv_transfer_params
            engine = self._route(request) if engine is None else engine  # a parent's children share its engine
            self._send(request, engine)
        finished = False
        try:
            while not finished:
                output = await collector.get()  # the newest: outputs are cumulative
                finished = output.finished
                yield output
        finally:
            if not finished:
                self._abort(request_id)

    async def encode(
        self,
        prompt_token_ids: list[int],
        pooling_params: PoolingParams,
        request_id: str,
        cache_salt: str | None = None,
        mm_items: list[MultiModalItem] | None = None,
    ) -> PoolingRequestOutput[PoolingOutput]:
        """Pool one prompt (complete params, see `pooling_inputs.params`; media items in place, see
        `pooling.inputs.expand_media`); cancelling aborts it in the engine."""
        self._ensure_output_task()
        if self.errored:
            raise EngineDeadError(self.errored)
        self.pooling_inputs.validate(prompt_token_ids, pooling_params)
        if self.log_requests:
            logger.info("Received request %s: %d prompt tokens, %r", request_id, len(prompt_token_ids), pooling_params)
        future = self.pooling.add(request_id, prompt_token_ids)
        request = EngineCoreRequest(request_id, prompt_token_ids, None, None, time.time(), cache_salt=cache_salt,
                                    pooling_params=pooling_params, mm_items=mm_items or [])
        self._send(request, self._route(request))
        try:
            return await future
        finally:
            if self.pooling.forget(request_id):  # left before its output came
                self._broadcast(Abort([request_id]))

    async def abort(self, request_id: str) -> None:
        self._abort(request_id)

    def _abort(self, request_id: str) -> None:
        child_ids, stats = self.output_processor.abort_request(request_id)
        if child_ids:
            self._broadcast(Abort(child_ids))
        for stat_logger in self.stat_loggers:
            stat_logger.record(None, stats)

    async def check_health(self) -> None:
        self._ensure_output_task()  # which pings the engines, so `silent_for` is meaningful
        if self.errored or self._link.addresses.first_dead() is not None:
            raise EngineDeadError(self.errored or "an engine process is not running")

    def silent_for(self) -> float:
        """Seconds since the engine last answered: it reports every step and is pinged each second it is quiet, so
        a few seconds of silence mean a frozen engine (stopped, or stuck in one step)."""
        return time.monotonic() - self.last_heard

    async def reset_prefix_cache(self) -> None:
        """Drop every cached block not in use; returns once the engine has."""
        await self._call(ResetPrefixCache)

    async def add_lora(self, lora_name: str, lora_path: str, replace: bool = False) -> LoRARequest:
        """Load an adapter and serve it under `lora_name`; raises ValueError saying why it cannot be served.
        `replace`: an adapter already served under that name is dropped once the new one serves (running requests
        finish with it)."""
        lora = self.loras.reserve(lora_name, lora_path, replace)
        try:
            error = await self._call(AddLoRA, lora, replace)
        except BaseException:
            self.loras.abandon(lora)
            raise
        if error is not None:
            self.loras.abandon(lora)
            raise ValueError(error)
        replaced = self.loras.commit(lora)
        if replaced is not None:
            await self._call(RemoveLoRA, replaced.lora_int_id)
        return lora

    async def remove_lora(self, lora_name: str) -> None:
        """Stop serving an adapter (UnknownLoRAError if none has that name); running requests finish with it."""
        if self.joined and self.loras.get(lora_name) is None:  # another API process may have loaded it
            await self.refresh_loras()
        lora = self.loras.remove(lora_name)
        await self._call(RemoveLoRA, lora.lora_int_id)

    async def refresh_loras(self) -> None:
        """Serve the engines' adapter table as it is now (another API process may have changed it)."""
        await self._call(RefreshLoRAs)

    async def _call(self, kind: type[EngineCall], *args: Any) -> str | None:
        """Ask the engine process to do something and wait for its reply (an error message or None)."""
        self._ensure_output_task()
        if self.errored:
            raise EngineDeadError(self.errored)
        call_id = next(self._call_ids)
        reply = self._calls[call_id] = asyncio.get_running_loop().create_future()
        self._call_replies[call_id] = []
        self._broadcast(kind(call_id, *args))
        try:
            return await reply
        finally:
            self._calls.pop(call_id, None)
            self._call_replies.pop(call_id, None)

    def _route(self, request: EngineCoreRequest) -> int:
        return 0 if self._router is None else self._router.route(request)

    def _send(self, message: Any, engine: int) -> None:
        if self._media_senders is None or not isinstance(message, EngineCoreRequest):
            self._sockets[engine].send(pack(message))
            return
        try:
            self._sockets[engine].send(pack(self._media_senders.strip(message, engine)))
        except BaseException:
            self._media_senders.reset(engine)
            raise

    def _broadcast(self, message: Any) -> None:
        data = pack(message)
        for sock in self._sockets:
            sock.send(data)

    def _ensure_output_task(self) -> None:
        if self._output_task is None or self._output_task.done() and not self.errored:
            self.last_heard = time.monotonic()  # the silence before anyone listened does not count
            self._output_task = asyncio.get_running_loop().create_task(self._output_loop())

    async def _output_loop(self) -> None:
        poller = zmq.asyncio.Poller()
        for sock in self._sockets:
            poller.register(sock, zmq.POLLIN)
        sockets = {sock: i for i, sock in enumerate(self._sockets)}
        while True:
            ready = await poller.poll(_PING_INTERVAL_MS)
            if not ready:
                dead = self._link.addresses.first_dead()
                if dead is not None:
                    self._fail_all(self._group.exit_message(dead) if self._group else "the engine process exited")
                    return
                self._broadcast(Ping())
                continue
            for sock, _ in ready:
                message = unpack(await sock.recv())
                self.last_heard = time.monotonic()
                if isinstance(message, EngineFailed):
                    self._fail_all(f"the engine failed:\n{message.traceback}")
                    return
                if isinstance(message, EngineCoreOutputs):
                    if self._router is not None and message.scheduler_stats is not None:
                        self._router.report(sockets[sock], message.scheduler_stats)
                        self._latest_stats[sockets[sock]] = message.scheduler_stats
                        message.scheduler_stats = _across_engines(self._latest_stats, message.scheduler_stats)
                    self._handle_outputs(message)
                elif isinstance(message, CallReply):
                    self._take_reply(message)
                elif isinstance(message, LoRATable) and sockets[sock] == 0:  # the engines' tables are the same
                    self.loras.sync(message.adapters)

    def _take_reply(self, message: CallReply) -> None:
        """An engine's reply to a call sent to all: answered once every engine has (with the first error)."""
        replies = self._call_replies.get(message.call_id)
        reply = self._calls.get(message.call_id)
        if replies is None or reply is None or reply.done():
            return
        replies.append(message.error)
        if len(replies) == len(self._sockets):
            reply.set_result(next((error for error in replies if error is not None), None))

    def _handle_outputs(self, outputs: EngineCoreOutputs) -> None:
        scheduled = outputs.scheduler_stats.first_scheduled if outputs.scheduler_stats is not None else None
        processed = self.output_processor.process_outputs(outputs.outputs, scheduled)
        for parent, output in processed.request_outputs:
            parent.queue.put_nowait(output)
        if processed.to_abort:
            self._broadcast(Abort(processed.to_abort))
        for stat_logger in self.stat_loggers:
            stat_logger.record(outputs.scheduler_stats, processed.stats)
        pooled_stats = self.pooling.process(outputs.outputs, scheduled)
        if pooled_stats is not None:
            for stat_logger in self.stat_loggers:
                stat_logger.record(None, pooled_stats)

    def _fail_all(self, reason: str) -> None:
        logger.error(reason)
        self.errored = reason
        for parent in list(self.output_processor.parents.values()):
            parent.queue.put_nowait(EngineDeadError(reason))
        self.output_processor.parents.clear()
        self.output_processor.children.clear()
        self.pooling.fail_all(EngineDeadError(reason))
        for reply in self._calls.values():
            if not reply.done():
                reply.set_exception(EngineDeadError(reason))

    def shutdown(self) -> None:
        """Stop the engines this process started (engines it joined are their starter's to stop)."""
        if self._group is not None:
            self._group.stop()
        if self._output_task is not None:
            self._output_task.cancel()
        for sock in self._sockets:
            sock.close(linger=0)
        self._ctx.term()


def _across_engines(latest: list[SchedulerStats], step: SchedulerStats) -> SchedulerStats:
    """One engine's step stats as the server's: its counters as they are (they count that step only), its gauges
    replaced by all engines' latest: requests summed, KV usage averaged."""
    return dataclasses.replace(
        step,
        num_running=sum(s.num_running for s in latest),
        num_waiting=sum(s.num_waiting for s in latest),
        kv_cache_usage=sum(s.kv_cache_usage for s in latest) / len(latest),
    )

"""AsyncLLM: the server's client of an EngineCore running in its own process.

The front end owns tokenization, detokenization, stop strings and metrics; the engine process owns
the model. They talk over ZeroMQ (PUSH/PULL over ipc sockets) with the declared messages of `messages.py`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

import zmq
import zmq.asyncio

from loomserve.adapters.registry import LoRARegistry
from loomserve.adapters.request import LoRARequest
from loomserve.modalities.inputs import MultiModalItem
from loomserve.platform.config import EngineArgs
from loomserve.platform.engine import run_engine_core
from loomserve.platform.input_processor import InputProcessor, load_tokenizer
from loomserve.platform.messages import (
    Abort,
    AddLoRA,
    CallReply,
    EngineCall,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineFailed,
    Ready,
    RemoveLoRA,
    ResetPrefixCache,
    Shutdown,
    pack,
    unpack,
)
from loomserve.platform.output_processor import OutputProcessor
from loomserve.platform.request import RequestOutput, SamplingParams
from loomserve.platform.stats import IterationStats, SchedulerStats
from loomserve.platform.threads import set_child_env
from loomserve.pooling.inputs import PoolingInputs
from loomserve.pooling.outputs import PoolingOutput, PoolingRequestOutput
from loomserve.pooling.params import PoolingParams
from loomserve.pooling.tracker import PoolingTracker

logger = logging.getLogger(__name__)

_STARTUP_TIMEOUT_S = 900.0


class EngineDeadError(RuntimeError):
    pass


class StatLogger(Protocol):
    def record(self, scheduler_stats: SchedulerStats | None, iteration_stats: IterationStats | None) -> None: ...


class AsyncLLM:
    def __init__(self, args: EngineArgs, stat_loggers: list[StatLogger] | None = None,
                 log_requests: bool = False) -> None:
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
        self.loras = LoRARegistry(args.enable_lora, self.model_config.served_model_name)
        self._calls: dict[int, asyncio.Future] = {}  # engine calls awaiting their reply
        self._call_ids = itertools.count()
        self._ipc_dir = tempfile.mkdtemp(prefix="loomserve-")
        input_addr = f"ipc://{os.path.join(self._ipc_dir, 'input')}"
        output_addr = f"ipc://{os.path.join(self._ipc_dir, 'output')}"
        self._ctx = zmq.asyncio.Context()
        self._inbox = self._ctx.socket(zmq.PUSH)  # the engine's inbox: requests and aborts
        self._inbox.bind(input_addr)
        self._outbox = self._ctx.socket(zmq.PULL)  # the engine's outbox: outputs and stats
        self._outbox.bind(output_addr)
        set_child_env()  # the engine's OpenMP reads its wait policy when it starts
        self._proc = multiprocessing.get_context("spawn").Process(
            target=run_engine_core, args=(args, input_addr, output_addr), name="loomserve-engine", daemon=True
        )
        self._proc.start()
        self._wait_ready()

    @classmethod
    def from_engine_args(cls, args: EngineArgs, stat_loggers: list[StatLogger] | None = None) -> AsyncLLM:
        return cls(args, stat_loggers)

    def _wait_ready(self) -> None:
        """Block until the engine process has loaded the model (or died trying)."""
        sock = zmq.Socket.shadow(self._outbox.underlying)
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if sock.poll(500):
                message = unpack(sock.recv())
                if isinstance(message, Ready):
                    return
                if isinstance(message, EngineFailed):
                    self.shutdown()
                    raise RuntimeError(f"the engine failed to start:\n{message.traceback}")
            elif not self._proc.is_alive():
                self.shutdown()
                raise RuntimeError(f"the engine process exited with code {self._proc.exitcode} during start-up")
        self.shutdown()
        raise RuntimeError("the engine did not start in time")

    async def generate(
        self,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        request_id: str,
        prompt: str | None = None,
        mm_items: list[MultiModalItem] | None = None,
        lora_request: LoRARequest | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream cumulative outputs of one request; leaving early aborts it in the engine."""
        self._ensure_output_task()
        if self.errored:
            raise EngineDeadError(self.errored)
        self.input_processor.validate(prompt_token_ids, sampling_params)
        if self.log_requests:
            logger.info("Received request %s: %d prompt tokens, %r, adapter %s", request_id, len(prompt_token_ids),
                        sampling_params, lora_request.lora_name if lora_request else None)
        queue: asyncio.Queue = asyncio.Queue()
        children = self.output_processor.add_request(
            request_id, prompt, prompt_token_ids, sampling_params, time.time(), queue
        )
        for child_id, params in children:
            request = self.input_processor.engine_request(
                child_id, prompt_token_ids, params, mm_items=mm_items or (), lora_request=lora_request
            )
            self._send(request)
        finished = False
        try:
            while not finished:
                output = await queue.get()
                while not queue.empty():  # outputs are cumulative: only the newest matters
                    output = queue.get_nowait()
                if isinstance(output, Exception):
                    raise output
                finished = output.finished
                yield output
        finally:
            if not finished:
                self._abort(request_id)

    async def encode(
        self, prompt_token_ids: list[int], pooling_params: PoolingParams, request_id: str
    ) -> PoolingRequestOutput[PoolingOutput]:
        """Pool one prompt (complete params, see `pooling_inputs.params`); cancelling aborts it in the engine."""
        self._ensure_output_task()
        if self.errored:
            raise EngineDeadError(self.errored)
        self.pooling_inputs.validate(prompt_token_ids, pooling_params)
        if self.log_requests:
            logger.info("Received request %s: %d prompt tokens, %r", request_id, len(prompt_token_ids), pooling_params)
        future = self.pooling.add(request_id, prompt_token_ids)
        request = EngineCoreRequest(request_id, prompt_token_ids, None, None, time.time(),
                                    pooling_params=pooling_params)
        self._send(request)
        try:
            return await future
        finally:
            if self.pooling.forget(request_id):  # left before its output came
                self._send(Abort([request_id]))

    async def abort(self, request_id: str) -> None:
        self._abort(request_id)

    def _abort(self, request_id: str) -> None:
        child_ids, stats = self.output_processor.abort_request(request_id)
        if child_ids:
            self._send(Abort(child_ids))
        for stat_logger in self.stat_loggers:
            stat_logger.record(None, stats)

    async def check_health(self) -> None:
        if self.errored or not self._proc.is_alive():
            raise EngineDeadError(self.errored or "the engine process is not running")

    async def reset_prefix_cache(self) -> None:
        """Drop every cached block not in use; returns once the engine has."""
        await self._call(ResetPrefixCache)

    async def add_lora(self, lora_name: str, lora_path: str) -> LoRARequest:
        """Load an adapter and serve it under `lora_name`; raises ValueError saying why it cannot be served."""
        lora = self.loras.reserve(lora_name, lora_path)
        try:
            error = await self._call(AddLoRA, lora)
        except BaseException:
            self.loras.abandon(lora)
            raise
        if error is not None:
            self.loras.abandon(lora)
            raise ValueError(error)
        self.loras.commit(lora)
        return lora

    async def remove_lora(self, lora_name: str) -> None:
        """Stop serving an adapter (UnknownLoRAError if none has that name); running requests finish with it."""
        lora = self.loras.remove(lora_name)
        await self._call(RemoveLoRA, lora.lora_int_id)

    async def _call(self, kind: type[EngineCall], *args: Any) -> str | None:
        """Ask the engine process to do something and wait for its reply (an error message or None)."""
        self._ensure_output_task()
        if self.errored:
            raise EngineDeadError(self.errored)
        call_id = next(self._call_ids)
        reply = self._calls[call_id] = asyncio.get_running_loop().create_future()
        self._send(kind(call_id, *args))
        try:
            return await reply
        finally:
            self._calls.pop(call_id, None)

    def _send(self, message: Any) -> None:
        self._inbox.send(pack(message))

    def _ensure_output_task(self) -> None:
        if self._output_task is None or self._output_task.done() and not self.errored:
            self._output_task = asyncio.get_running_loop().create_task(self._output_loop())

    async def _output_loop(self) -> None:
        while True:
            if not await self._outbox.poll(1000):
                if not self._proc.is_alive():
                    self._fail_all(f"the engine process exited with code {self._proc.exitcode}")
                    return
                continue
            message = unpack(await self._outbox.recv())
            if isinstance(message, EngineFailed):
                self._fail_all(f"the engine failed:\n{message.traceback}")
                return
            if isinstance(message, EngineCoreOutputs):
                self._handle_outputs(message)
            elif isinstance(message, CallReply):
                reply = self._calls.get(message.call_id)
                if reply is not None and not reply.done():
                    reply.set_result(message.error)

    def _handle_outputs(self, outputs: EngineCoreOutputs) -> None:
        processed = self.output_processor.process_outputs(outputs.outputs)
        for parent, output in processed.request_outputs:
            parent.queue.put_nowait(output)
        if processed.to_abort:
            self._send(Abort(processed.to_abort))
        for stat_logger in self.stat_loggers:
            stat_logger.record(outputs.scheduler_stats, processed.stats)
        pooled_stats = self.pooling.process(outputs.outputs)
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
        if self._proc.is_alive():
            try:
                self._inbox.send(pack(Shutdown()), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            self._proc.join(timeout=5)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(timeout=5)
        if self._output_task is not None:
            self._output_task.cancel()
        self._inbox.close(linger=0)
        self._outbox.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self._ipc_dir, ignore_errors=True)

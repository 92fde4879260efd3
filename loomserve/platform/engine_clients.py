"""The engine process's side of its front ends: one ROUTER socket that every API process (a client, told apart by its
socket's identity) talks through.

A request's outputs go back to the client that sent it, a step's outputs in one message per client; a call's reply
goes to its caller; the adapter table is kept here and sent to every client when it changes. A ROUTER drops what it
cannot deliver, so a client that died never blocks the engine.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import zmq

from loomserve.adapters.registry import already_loaded
from loomserve.adapters.request import LoRARequest
from loomserve.platform.messages import (
    Abort,
    AddLoRA,
    CallReply,
    EngineCoreOutputs,
    EngineCoreRequest,
    LoRATable,
    RefreshLoRAs,
    RemoveLoRA,
    pack,
    unpack,
)
from loomserve.platform.stats import SchedulerStats

if TYPE_CHECKING:
    from loomserve.platform.messages import EngineCall


@dataclass
class _Caller:
    client: bytes  # the caller's socket identity
    call_id: int  # the id the caller gave its call (each client counts its own)
    call: EngineCall


class EngineClients:
    def __init__(self, ctx: zmq.Context, address: str) -> None:
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.SNDHWM, 0)  # a busy client's outputs queue; only a gone client's are dropped
        self.socket.bind(address)
        self.clients: list[bytes] = []  # every client heard from, in order
        self.owners: dict[str, bytes] = {}  # request id -> the client that sent it
        self.loras: dict[str, LoRARequest] = {}  # the adapters served, by name
        self._callers: dict[int, _Caller] = {}  # engine-wide call id -> who asked
        self._call_ids = itertools.count()

    def receive(self) -> tuple[bytes, Any]:
        """The next message and the client it came from (requests are remembered as that client's)."""
        client, data = self.socket.recv_multipart()
        if client not in self.clients:
            self.clients.append(client)
        message = unpack(data)
        if isinstance(message, EngineCoreRequest):
            self.owners[message.request_id] = client
        elif isinstance(message, Abort):
            for request_id in message.request_ids:
                self.owners.pop(request_id, None)
        return client, message

    def take_call(self, client: bytes, call: EngineCall) -> EngineCall | None:
        """The call to hand the engine, under an id unique across clients; None when answered here (a refresh of
        the adapter table, an adapter name already taken)."""
        if isinstance(call, RefreshLoRAs):
            self._send(client, LoRATable(list(self.loras.values())))
            self._send(client, CallReply(call.call_id))
            return None
        if isinstance(call, AddLoRA) and not call.replace and self._name_taken(call.lora.lora_name):
            self._send(client, CallReply(call.call_id, already_loaded(call.lora.lora_name)))
            return None
        call_id = next(self._call_ids)
        self._callers[call_id] = _Caller(client, call.call_id, call)
        return replace(call, call_id=call_id)

    def _name_taken(self, name: str) -> bool:
        loading = (c.call for c in self._callers.values())
        return name in self.loras or any(isinstance(c, AddLoRA) and c.lora.lora_name == name for c in loading)

    def reply(self, reply: CallReply) -> None:
        """A done call's reply, to its caller; a change of the adapters served goes to every client first."""
        caller = self._callers.pop(reply.call_id)
        if reply.error is None and isinstance(caller.call, AddLoRA | RemoveLoRA):
            self._update_loras(caller.call)
            self.broadcast(LoRATable(list(self.loras.values())))
        self._send(caller.client, CallReply(caller.call_id, reply.error))

    def _update_loras(self, call: AddLoRA | RemoveLoRA) -> None:
        if isinstance(call, AddLoRA):
            self.loras[call.lora.lora_name] = call.lora
        else:
            self.loras = {name: lora for name, lora in self.loras.items() if lora.lora_int_id != call.lora_id}

    def send_step(self, outputs: EngineCoreOutputs) -> None:
        """A step's outputs, one message to every client (its requests' outputs, possibly none, and the step's
        stats: each client's router and gauges read them)."""
        mine: dict[bytes, list] = {client: [] for client in self.clients}
        for output in outputs.outputs:
            client = self.owners.get(output.request_id)
            if client is not None:
                mine[client].append(output)
            if output.finish_reason is not None:
                self.owners.pop(output.request_id, None)
        for client, its_outputs in mine.items():
            self._send(client, EngineCoreOutputs(its_outputs, outputs.scheduler_stats))

    def send_report(self, stats: SchedulerStats, clients: list[bytes]) -> None:
        """The engine's state with no outputs, to `clients` (those that pinged or aborted)."""
        for client in clients:
            self._send(client, EngineCoreOutputs([], stats))

    def broadcast(self, message: Any) -> None:
        data = pack(message)
        for client in self.clients:
            self.socket.send_multipart([client, data])

    def _send(self, client: bytes, message: Any) -> None:
        self.socket.send_multipart([client, pack(message)])

    def close(self) -> None:
        self.socket.close(linger=1000)

"""The engine's side of several front ends (`EngineClients`): each API process gets its own requests' outputs and its
own call replies, every one learns the adapter table, and a front end that is gone never blocks the engine."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import zmq

from loomserve.adapters.request import LoRARequest
from loomserve.platform.engine_clients import EngineClients
from loomserve.platform.messages import (
    AddLoRA,
    CallReply,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    LoRATable,
    RefreshLoRAs,
    ResetPrefixCache,
    pack,
    unpack,
)
from loomserve.platform.stats import SchedulerStats

ADAPTER = LoRARequest("sql", 1, "/adapters/sql")


@pytest.fixture
def wired(tmp_path) -> Iterator[tuple[EngineClients, list[zmq.Socket]]]:
    """The engine's socket and two front ends' (client 0 and 1), each already heard from."""
    ctx = zmq.Context()
    address = f"ipc://{tmp_path / 'engine'}"
    engine = EngineClients(ctx, address)
    fronts = []
    for index in range(2):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, str(index).encode())
        sock.connect(address)
        fronts.append(sock)
        sock.send(pack(EngineCoreRequest(f"req-{index}", [1, 2], None, None, 0.0)))
        engine.receive()
    yield engine, fronts
    for sock in fronts:
        sock.close(linger=0)
    engine.socket.close(linger=0)
    ctx.term()


def received(sock: zmq.Socket) -> list:
    messages = []
    while sock.poll(200):
        messages.append(unpack(sock.recv()))
    return messages


def test_each_client_gets_only_its_own_requests_outputs_and_every_client_the_step_stats(wired):
    engine, fronts = wired
    stats = SchedulerStats(num_running=2)
    engine.send_step(EngineCoreOutputs([EngineCoreOutput("req-0", [7]), EngineCoreOutput("req-1", [8])], stats))
    for index, sock in enumerate(fronts):
        [outputs] = received(sock)
        assert [o.request_id for o in outputs.outputs] == [f"req-{index}"]
        assert outputs.scheduler_stats.num_running == 2


def test_a_finished_request_is_forgotten(wired):
    engine, _ = wired
    engine.send_step(EngineCoreOutputs([EngineCoreOutput("req-0", [7], finish_reason="stop")]))
    assert list(engine.owners) == ["req-1"]


def test_a_call_reply_goes_to_its_caller_under_the_callers_id(wired):
    engine, fronts = wired
    for sock in fronts:  # both number their first call 0
        sock.send(pack(ResetPrefixCache(0)))
    received_by_engine = [engine.receive() for _ in fronts]  # in whichever order they arrive
    calls = {client: engine.take_call(client, message) for client, message in received_by_engine}
    assert len({call.call_id for call in calls.values()}) == 2  # told apart in the engine
    engine.reply(CallReply(calls[b"1"].call_id, "no"))
    assert received(fronts[1]) == [CallReply(0, "no")] and received(fronts[0]) == []


def test_a_loaded_adapter_is_announced_to_every_client_and_its_name_refused_twice(wired):
    engine, fronts = wired
    fronts[0].send(pack(AddLoRA(0, ADAPTER)))
    engine.reply(CallReply(engine.take_call(*engine.receive()).call_id))
    assert received(fronts[0]) == [LoRATable([ADAPTER]), CallReply(0)]
    assert received(fronts[1]) == [LoRATable([ADAPTER])]
    fronts[1].send(pack(AddLoRA(0, LoRARequest("sql", 2, "/adapters/sql"))))
    assert engine.take_call(*engine.receive()) is None
    [refused] = received(fronts[1])
    assert "has already been loaded" in refused.error


def test_a_refresh_is_answered_with_the_table_before_its_reply(wired):
    engine, fronts = wired
    engine.loras = {"sql": ADAPTER}
    fronts[1].send(pack(RefreshLoRAs(3)))
    assert engine.take_call(*engine.receive()) is None
    assert received(fronts[1]) == [LoRATable([ADAPTER]), CallReply(3)]


def test_a_client_that_is_gone_does_not_block_the_engine(wired):
    engine, fronts = wired
    fronts[1].close(linger=0)
    start = time.monotonic()
    for _ in range(5000):  # far beyond a socket's default high-water mark of 1000 messages
        engine.send_step(EngineCoreOutputs([EngineCoreOutput("req-1", [8])]))
    assert time.monotonic() - start < 5
    assert len(received(fronts[0])) == 5000

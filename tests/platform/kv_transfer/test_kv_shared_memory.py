"""Blocks between instances through shared memory: a held request's blocks are written to their own file, read
back unchanged once by a consumer (from the first it lacks), which removes the file; a file nobody took goes at the
timeout; a consumer of another block layout refuses it, and stops waiting for a producer that is gone; consumers
read only names a producer makes."""

from __future__ import annotations

import time

import pytest
import torch

from loomserve.platform.kv_transfer.shared_memory import (
    ProducerLock,
    SharedMemoryTransport,
    is_file_name,
    new_file_name,
)


def _transport(directory, head_dim: int = 8, timeout_s: float = 60.0) -> SharedMemoryTransport:
    g = torch.Generator().manual_seed(head_dim)
    t = SharedMemoryTransport(str(directory), timeout_s)
    t.register_kv_caches([torch.randn(2, 10, 4, 2, head_dim, generator=g) for _ in range(3)])  # 3 layers, 10 blocks
    return t


def _written(producer: SharedMemoryTransport, request_id: str) -> None:
    deadline = time.monotonic() + 5
    while request_id not in producer.take_sent():
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.fixture
def lock(tmp_path) -> ProducerLock:
    lock = ProducerLock(str(tmp_path))
    yield lock
    lock.file.close()


def _hold(producer: SharedMemoryTransport, block_ids: list[int], lock: ProducerLock) -> dict:
    params = {"remote_block_ids": block_ids, "remote_file": new_file_name(), "remote_lock": lock.name,
              "skip_blocks": 0}
    producer.hold({"r": params}, [])
    return params


def _files(directory) -> list:
    return [p for p in directory.iterdir() if not p.name.endswith(".lock")]


def test_held_blocks_are_read_back_unchanged_once_and_the_file_removed(tmp_path, lock):
    producer, consumer = _transport(tmp_path), _transport(tmp_path)
    params = _hold(producer, [7, 2, 5], lock)
    blocks = consumer.fetch({**params, "remote_block_ids": [2, 5], "skip_blocks": 1}, timeout_s=5)  # has block 7
    for layer, cache in enumerate(producer.caches):
        assert torch.equal(blocks[:, layer].transpose(0, 1), cache[:, [2, 5]])
    _written(producer, "r")
    assert _files(tmp_path) == []
    with pytest.raises(TimeoutError):
        consumer.fetch(params, timeout_s=0.05)


def test_a_file_no_consumer_took_is_removed_at_the_timeout(tmp_path, lock):
    producer = _transport(tmp_path, timeout_s=0.1)
    _hold(producer, [1], lock)
    _written(producer, "r")
    assert len(_files(tmp_path)) == 1
    time.sleep(0.5)
    assert _files(tmp_path) == []


def test_a_consumer_with_another_block_layout_refuses_the_file(tmp_path, lock):
    producer, consumer = _transport(tmp_path), _transport(tmp_path, head_dim=4)
    params = _hold(producer, [3], lock)
    with pytest.raises(OSError, match="bytes"):
        consumer.fetch(params, timeout_s=5)


def test_a_consumer_stops_waiting_once_the_producer_is_gone(tmp_path):
    lock = ProducerLock(str(tmp_path))
    consumer = _transport(tmp_path)
    load = {"remote_block_ids": [1], "remote_file": new_file_name(), "remote_lock": lock.name, "skip_blocks": 0}
    with pytest.raises(TimeoutError):
        consumer.fetch(load, timeout_s=0.05)  # the producer lives: the consumer waits
    lock.file.close()  # as the kernel does when a process dies
    with pytest.raises(ConnectionError, match="is gone"):
        consumer.fetch(load, timeout_s=30)


@pytest.mark.parametrize("name", ["../etc/passwd", "/dev/shm/x", "loomserve-kv-../../x", None])
def test_consumers_read_only_names_a_producer_makes(name):
    assert is_file_name(new_file_name()) and not is_file_name(name)

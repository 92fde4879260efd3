"""The CPU tier's bookkeeping: hashes to host blocks, least recently used out first, blocks under a load kept."""

from __future__ import annotations

from loomserve.platform.kv_transfer.host_pool import HostBlockPool


def test_a_stored_hash_is_found_and_not_stored_twice():
    pool = HostBlockPool(2)
    host_id = pool.take(b"a")
    assert pool.lookup(b"a") == host_id
    assert pool.take(b"a") is None


def test_the_least_recently_used_hash_makes_room():
    pool = HostBlockPool(2)
    a, _ = pool.take(b"a"), pool.take(b"b")
    pool.read([b"a"])  # a hit makes "a" the most recently used
    pool.done_reading([a])
    assert pool.take(b"c") is not None
    assert pool.lookup(b"b") is None and pool.lookup(b"a") == a


def test_a_block_under_a_load_is_never_given_away():
    pool = HostBlockPool(1)
    pool.take(b"a")
    host_ids = pool.read([b"a"])
    assert pool.take(b"b") is None  # every host block is being read: the store is skipped
    pool.done_reading(host_ids)
    assert pool.take(b"b") == host_ids[0]

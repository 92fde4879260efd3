"""The KV block pool and prefix cache: refcounts, chained SHA-256 keys, LRU eviction, freeing."""

from __future__ import annotations

from loomserve.platform.kv_cache import BlockPool, KVCacheManager
from loomserve.platform.kv_cache.block_hash import block_extra_keys, hash_block, hash_request_blocks
from loomserve.platform.request import Request, SamplingParams


def make_request(request_id: str, tokens: list[int], salt: str | None = None) -> Request:
    return Request(request_id, tokens, SamplingParams(), cache_salt=salt)


def test_block_key_chains_the_whole_prefix():
    a = hash_request_blocks([1, 2, 3, 4, 5, 6, 7, 8], 4, [])
    b = hash_request_blocks([9, 2, 3, 4, 5, 6, 7, 8], 4, [])
    assert a[1] != b[1]  # same tokens in block 1, different parents
    assert len(a[0]) == 32  # a full SHA-256 digest


def test_block_key_covers_extra_keys():
    assert hash_block(None, [1, 2], ("salt",)) != hash_block(None, [1, 2])


def test_block_extra_keys_carry_the_adapter_everywhere_and_media_where_it_lies():
    adapter = ("lora", 1, "sql", "/adapters/sql")
    spans = [(5, 10, "img")]
    keys = [block_extra_keys(start, start + 4, "salt", spans, adapter) for start in (0, 4, 8, 12)]
    assert keys == [(("salt", "salt"), adapter), (adapter, ("mm", "img")), (adapter, ("mm", "img")), (adapter,)]
    assert block_extra_keys(4, 8, None, (), ()) == ()


def test_block_keys_differ_by_adapter_and_by_media_alike():
    tokens = list(range(16))
    base = hash_request_blocks(tokens, 4, [])
    adapted = hash_request_blocks(tokens, 4, [], adapter_key=("lora", 1, "a", "/a"))
    with_image = hash_request_blocks(tokens, 4, [], None, [(5, 10, "img")], ("lora", 1, "a", "/a"))
    assert all(x != y for x, y in zip(base, adapted))
    assert with_image[0] == adapted[0] and all(x != y for x, y in zip(with_image[1:], adapted[1:]))


def test_only_full_blocks_are_hashed():
    assert len(hash_request_blocks(list(range(11)), 4, [])) == 2


def test_allocation_takes_blocks_and_free_returns_them():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=False)
    req = make_request("a", list(range(10)))
    assert kv.allocate_slots(req, 10)
    assert len(kv.block_ids("a")) == 3 and kv.pool.num_free_blocks == 5
    kv.free(req)
    assert kv.pool.num_free_blocks == 8


def test_allocation_fails_cleanly_when_pool_is_short():
    kv = KVCacheManager(num_blocks=2, block_size=4, enable_caching=False)
    assert not kv.allocate_slots(make_request("a", list(range(12))), 12)
    assert kv.pool.num_free_blocks == 2


def test_prefix_hit_reuses_blocks_of_a_finished_request():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=True)
    first = make_request("a", list(range(10)))
    kv.allocate_slots(first, 10)
    first_blocks = list(kv.block_ids("a"))
    kv.free(first)
    second = make_request("b", list(range(10)) + [99])
    blocks, num_hit = kv.get_computed_blocks(second)
    assert num_hit == 8 and [b.block_id for b in blocks] == first_blocks[:2]


def test_prefix_hit_leaves_at_least_one_token_to_compute():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=True)
    first = make_request("a", list(range(8)))
    kv.allocate_slots(first, 8)
    _, num_hit = kv.get_computed_blocks(make_request("b", list(range(8))))
    assert num_hit == 4


def test_cache_salt_separates_tenants():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=True)
    kv.allocate_slots(make_request("a", list(range(9)), salt="tenant-1"), 9)
    _, num_hit = kv.get_computed_blocks(make_request("b", list(range(9)), salt="tenant-2"))
    assert num_hit == 0


def test_shared_blocks_are_refcounted():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=True)
    a, b = make_request("a", list(range(9))), make_request("b", list(range(9)))
    kv.allocate_slots(a, 9)
    blocks, num_hit = kv.get_computed_blocks(b)
    b.num_computed_tokens = 0
    kv.allocate_slots(b, 9 - num_hit, blocks)
    assert kv.pool.blocks[kv.block_ids("a")[0]].ref_cnt == 2
    kv.free(a)
    assert kv.pool.blocks[kv.block_ids("b")[0]].ref_cnt == 1


def test_least_recently_freed_block_is_evicted_first():
    pool = BlockPool(3, enable_caching=True)
    blocks = pool.allocate(3)
    for block, key in zip(blocks, [b"x", b"y", b"z"]):
        pool.cache(block, key)
    pool.free([blocks[1]])
    pool.free([blocks[0]])
    pool.allocate(1)
    assert pool.lookup(b"y") is None and pool.lookup(b"x") is blocks[0]


def test_freed_request_evicts_its_tail_blocks_first():
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_caching=True)
    req = make_request("a", [1, 2, 3, 4, 5, 6])
    kv.allocate_slots(req, 6)
    ids = list(kv.block_ids("a"))
    kv.free(req)
    unused = ({0, 1, 2, 3} - set(ids)).pop()
    assert list(kv.pool.free_queue) == [unused, *reversed(ids)]


def test_a_new_prompt_is_hashed_only_as_far_as_its_prefix_hits_then_as_its_chunks_fill_blocks():
    kv = KVCacheManager(num_blocks=64, block_size=4, enable_caching=True)
    request = make_request("r", list(range(40)))
    assert kv.get_computed_blocks(request) == ([], 0)
    assert len(kv.req_hashes["r"]) == 1  # the first block missed: nothing past it was hashed
    assert kv.allocate_slots(request, 12)
    assert len(kv.req_hashes["r"]) == 3  # the chunk filled three blocks

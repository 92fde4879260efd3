"""The encoder cache and its scheduling: an item is encoded in the step its placeholder range first enters the
batch and never again while cached; pinned outputs are never evicted, unpinned ones leave least recently used
first; chunks stop before items that cannot be encoded now. Prefix-cache keys include media content hashes."""

from __future__ import annotations

from loomserve.modalities.encoder_cache import EncoderCacheManager
from loomserve.modalities.inputs import MultiModalItem, PlaceholderRange
from loomserve.platform.config import CacheConfig, SchedulerConfig
from loomserve.platform.kv_cache.block_hash import hash_request_blocks
from loomserve.platform.request import Request, SamplingParams
from loomserve.platform.scheduler import Scheduler
from loomserve.platform.step import StepResult


def item(h: str, offset: int, length: int) -> MultiModalItem:
    return MultiModalItem("image", h, PlaceholderRange(offset, length))


def request(request_id: str, num_tokens: int, *items: MultiModalItem) -> Request:
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    return Request(request_id, list(range(100, 100 + num_tokens)), params, mm_items=list(items))


def step(manager: EncoderCacheManager, *chunks: tuple[Request, int, int]) -> tuple[list[int], list[str], list[str]]:
    """Fit and commit each (request, start, tokens) chunk as the scheduler does; (tokens granted, hashes to encode,
    hashes freed)."""
    manager.begin_step([])
    granted = []
    for req, start, n in chunks:
        n = manager.fit(req, start, n)
        if n:
            manager.commit(req, start, n)
        granted.append(n)
    data = manager.step_data([]) or {"encode": [], "free": []}
    return granted, data["encode"], data["free"]


def test_an_item_is_encoded_once_in_the_step_its_range_enters():
    manager = EncoderCacheManager(capacity=100, budget_per_step=100)
    r = request("r", 40, item("a", 5, 10), item("b", 20, 10))
    assert step(manager, (r, 0, 8)) == ([8], ["a"], [])  # tokens 5..7 of a: a encodes now
    assert step(manager, (r, 8, 8)) == ([8], [], [])  # the rest of a comes from the cache
    assert step(manager, (r, 16, 8)) == ([8], ["b"], [])
    assert step(manager, (r, 24, 16)) == ([16], [], [])
    assert manager.num_encoded == 2


def test_the_same_content_in_two_requests_is_encoded_once():
    manager = EncoderCacheManager(capacity=100, budget_per_step=100)
    r1, r2 = request("r1", 20, item("a", 2, 10)), request("r2", 30, item("a", 12, 10))
    assert step(manager, (r1, 0, 20), (r2, 0, 30)) == ([20, 30], ["a"], [])
    assert manager.pins["a"] == {"r1", "r2"}


def test_chunks_stop_before_items_that_do_not_fit_the_step_budget():
    manager = EncoderCacheManager(capacity=100, budget_per_step=12)
    r = request("r", 40, item("a", 2, 10), item("b", 12, 10))
    assert step(manager, (r, 0, 40)) == ([12], ["a"], [])  # b would exceed the budget: stop where b starts
    assert step(manager, (r, 12, 28)) == ([28], ["b"], [])
    big = request("big", 40, item("c", 0, 30))
    assert step(manager, (big, 0, 40)) == ([40], ["c"], [])  # an item over the budget runs alone in its step


def test_pinned_outputs_are_never_evicted_and_unpinned_ones_leave_least_recently_used_first():
    manager = EncoderCacheManager(capacity=30, budget_per_step=100)
    r1, r2, r3 = (request(f"r{i}", 20, item(h, 0, 10)) for i, h in enumerate("abc", 1))
    assert step(manager, (r1, 0, 20), (r2, 0, 20), (r3, 0, 20)) == ([20, 20, 20], ["a", "b", "c"], [])
    r4 = request("r4", 20, item("d", 0, 10))
    assert step(manager, (r4, 0, 20)) == ([0], [], [])  # a, b, c are pinned by unfinished requests
    manager.release(r2)
    manager.release(r1)
    assert step(manager, (r4, 0, 20)) == ([20], ["d"], ["b"])  # b was released first
    assert set(manager.sizes) == {"a", "c", "d"} and manager.used == 30
    r5 = request("r5", 20, item("a", 0, 10))
    assert step(manager, (r5, 0, 20)) == ([20], [], [])  # a found again, pinned again
    assert "a" not in manager.unpinned


def test_items_computed_past_are_unpinned_when_the_request_moves_on():
    manager = EncoderCacheManager(capacity=10, budget_per_step=100)
    r = request("r", 30, item("a", 0, 10), item("b", 10, 10))
    assert step(manager, (r, 0, 10)) == ([10], ["a"], [])
    assert step(manager, (r, 10, 20)) == ([20], ["b"], ["a"])  # a is done with: its room goes to b


def test_content_that_appears_again_later_in_the_prompt_stays_pinned():
    manager = EncoderCacheManager(capacity=20, budget_per_step=100)
    r = request("r", 40, item("a", 0, 10), item("c", 10, 10), item("a", 20, 10))
    assert step(manager, (r, 0, 10)) == ([10], ["a"], [])
    assert step(manager, (r, 10, 10)) == ([10], ["c"], [])  # the first a is done, the second is still ahead
    other = request("other", 20, item("b", 0, 10))
    assert step(manager, (other, 0, 20)) == ([0], [], [])  # so a stays pinned: no room for b


def test_an_item_that_can_never_fit_now_yields_no_tokens_and_is_not_committed():
    manager = EncoderCacheManager(capacity=10, budget_per_step=100)
    holder = request("holder", 20, item("a", 0, 10))
    step(manager, (holder, 0, 5))
    waiting = request("w", 20, item("b", 0, 10))
    assert step(manager, (waiting, 0, 20)) == ([0], [], [])
    assert "b" not in manager.sizes


def test_scheduler_splits_an_item_across_steps_and_encodes_it_at_its_first_chunk():
    cache = CacheConfig(block_size=4, enable_prefix_caching=True)
    encoder_cache = EncoderCacheManager(capacity=64, budget_per_step=64)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=6, max_num_seqs=4), cache, 256, 64, [encoder_cache])
    r = request("r", 20, item("img", 4, 9))
    scheduler.add_request(r)
    encoded_per_step = []
    while r.num_computed_tokens < r.num_prompt_tokens:
        out = scheduler.schedule()
        encoded_per_step.append(out.features["mm"]["encode"] if "mm" in out.features else [])
        scheduler.update_from_output(out, StepResult({s.request_id: [7] for s in out.scheduled if s.samples}))
    assert encoded_per_step == [["img"], [], [], []]  # tokens 0-5 (image starts at 4), 6-11, 12-17, 18-19
    scheduler.finish_requests(["r"], r.status.FINISHED_ABORTED)
    assert "img" in encoder_cache.unpinned  # kept for reuse after the request ends


def test_block_keys_include_the_content_hashes_of_overlapping_media():
    tokens = list(range(16))
    blocks = lambda h: hash_request_blocks(tokens, 4, [], None, [(5, 10, h)])
    a, a_again, b = blocks("hash-a"), blocks("hash-a"), blocks("hash-b")
    assert a == a_again
    assert a[0] == b[0]  # tokens 0-3: before the image
    assert all(x != y for x, y in zip(a[1:], b[1:]))  # blocks 1-2 hold it, block 3 chains from them
    assert hash_request_blocks(tokens, 4, [])[0] == a[0]

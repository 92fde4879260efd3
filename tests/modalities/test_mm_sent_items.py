"""Media items cross to an engine once while it holds them: the front end's sender and the engine's receiver make the
same moves, so an item sent without its tensors is always restored whole on the engine's side, whatever the
eviction, and several senders to one engine are kept apart."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoTokenizer

from loomserve.modalities.frontend import MultiModalFrontend
from loomserve.modalities.inputs import MultiModalItem, PlaceholderRange
from loomserve.modalities.sent_items import MediaReceivers, MediaSenders, media_senders
from loomserve.platform.config import EngineArgs
from loomserve.platform.messages import EngineCoreRequest, pack, unpack


def item(key: str, nbytes: int) -> MultiModalItem:
    pixels = torch.full((nbytes,), ord(key[0]), dtype=torch.uint8)
    return MultiModalItem("image", key, PlaceholderRange(0, 1), {"pixels": pixels})


def request(*items: MultiModalItem) -> EngineCoreRequest:
    return EngineCoreRequest("r", [1] * 4, None, None, 0.0, mm_items=list(items))


def through_the_socket(senders: MediaSenders, receivers: MediaReceivers, req: EngineCoreRequest,
                       engine: int = 0) -> tuple[EngineCoreRequest, int]:
    """What the engine makes of `req` once sent, and the bytes that crossed."""
    data = pack(senders.strip(req, engine))
    return receivers.restore(unpack(data)), len(data)


def test_an_item_the_engine_holds_crosses_without_its_tensors_and_is_restored_whole():
    senders, receivers = MediaSenders(10_000, 1), MediaReceivers(10_000)
    image = item("a", 4000)
    first, first_bytes = through_the_socket(senders, receivers, request(image))
    again, again_bytes = through_the_socket(senders, receivers, request(image))
    assert again_bytes < first_bytes - 4000
    assert torch.equal(again.mm_items[0].data["pixels"], image.data["pixels"])
    assert again.mm_sent is None


def test_both_sides_evict_alike_so_every_item_sent_as_held_is_held():
    rng = random.Random(0)
    senders, receivers = MediaSenders(1000, 1), MediaReceivers(1000)
    pool = {key: item(key, rng.choice([100, 250, 400, 1200])) for key in "abcdefghij"}  # 1200: never kept
    for _ in range(300):
        sent = [pool[rng.choice("abcdefghij")] for _ in range(rng.randint(1, 3))]
        got, _ = through_the_socket(senders, receivers, request(*sent))
        for want, have in zip(sent, got.mm_items, strict=True):
            assert torch.equal(have.data["pixels"], want.data["pixels"])
    [receiver] = receivers.by_sender.values()
    assert list(receiver.store.entries) == list(senders.by_engine[0].held.entries)


def test_senders_to_one_engine_have_stores_of_their_own():
    receivers = MediaReceivers(10_000)
    one, two = MediaSenders(10_000, 1), MediaSenders(10_000, 1)
    image = item("a", 1000)
    through_the_socket(one, receivers, request(image))
    got, crossed = through_the_socket(two, receivers, request(image))  # new to this sender: sent in full
    assert crossed > 1000 and len(receivers.by_sender) == 2
    assert torch.equal(got.mm_items[0].data["pixels"], image.data["pixels"])


def test_after_a_failed_send_the_sender_starts_over_under_a_new_id():
    senders, receivers = MediaSenders(10_000, 2), MediaReceivers(10_000)
    image = item("a", 1000)
    through_the_socket(senders, receivers, request(image), engine=1)
    lost = senders.by_engine[1].sender_id
    senders.strip(request(image), 1)  # stripped, then the write to the socket failed
    senders.reset(1)
    got, crossed = through_the_socket(senders, receivers, request(image), engine=1)
    assert senders.by_engine[1].sender_id != lost and crossed > 1000
    assert torch.equal(got.mm_items[0].data["pixels"], image.data["pixels"])


@pytest.mark.parametrize(("family", "gib", "on"), [("qwen2_vl", 4, True), ("qwen2_vl", 0, False), ("text", 4, False)])
def test_a_front_end_sends_through_senders_for_media_models_with_the_cache_on(mm_checkpoint, qwen2_checkpoint,
                                                                              family, gib, on):
    path = qwen2_checkpoint if family == "text" else mm_checkpoint(family)
    config = EngineArgs(model=path, mm_processor_cache_gb=gib).create_engine_config()
    frontend = MultiModalFrontend(config.model_config, AutoTokenizer.from_pretrained(path), config.mm_config)
    senders = media_senders(config, frontend, num_engines=2)
    assert (senders is not None) == on
    if on:
        assert len(senders.by_engine) == 2 and senders.capacity == 4 << 30

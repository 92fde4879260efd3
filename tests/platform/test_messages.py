"""Front end <-> engine messages survive their msgpack wire form, every field in its own place."""

from __future__ import annotations

import torch

from loomserve.adapters.request import LoRARequest
from loomserve.modalities.inputs import MultiModalItem, PlaceholderRange
from loomserve.platform.messages import EngineCoreRequest, MessageType, pack, unpack
from loomserve.platform.request import SamplingParams
from loomserve.pooling.params import PoolingParams


def round_trip(request: EngineCoreRequest) -> EngineCoreRequest:
    kind, payload = unpack(pack(MessageType.ADD, request.to_wire()))
    assert kind == MessageType.ADD
    return EngineCoreRequest.from_wire(payload)


def test_a_request_with_an_adapter_and_media_keeps_both():
    pixels = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    item = MultiModalItem("image", "ab" * 32, PlaceholderRange(2, 4), {"pixel_values": pixels}, {"fps": 2.0})
    request = EngineCoreRequest("r", [1, 2, 3, 3, 3, 3, 4], SamplingParams(max_tokens=5), 0, 1.5, "salt",
                                lora_request=LoRARequest("sql", 3, "/adapters/sql"), mm_items=[item])
    back = round_trip(request)
    assert back.lora_request == request.lora_request
    [got] = back.mm_items
    assert (got.modality, got.content_hash, got.placeholder, got.meta) == ("image", "ab" * 32, item.placeholder,
                                                                           {"fps": 2.0})
    assert torch.equal(got.data["pixel_values"], pixels)
    assert (back.request_id, back.prompt_token_ids, back.cache_salt) == ("r", request.prompt_token_ids, "salt")
    assert back.sampling_params.max_tokens == 5


def test_a_plain_request_has_neither():
    back = round_trip(EngineCoreRequest("r", [1, 2], SamplingParams(), None, 0.0))
    assert back.lora_request is None and back.mm_items == [] and back.pooling_params is None


def test_a_pooling_request_keeps_its_params_and_adapter_without_sampling():
    params = PoolingParams("MEAN", normalize=True, dimensions=8, token_type_ids=[0, 0, 1])
    request = EngineCoreRequest("p", [5, 6, 7], None, None, 0.0, lora_request=LoRARequest("sql", 3, "/adapters/sql"),
                                pooling_params=params)
    back = round_trip(request)
    assert back.sampling_params is None and back.mm_items == []
    assert back.pooling_params == params and back.lora_request == request.lora_request

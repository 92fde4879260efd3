"""Front end <-> engine messages survive their wire form, typed by name, every field in its own place."""

from __future__ import annotations

import torch

from loomserve.adapters.request import LoRARequest
from loomserve.modalities.inputs import MultiModalItem, PlaceholderRange
from loomserve.platform.messages import (
    Abort,
    AddLoRA,
    CallReply,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    pack,
    unpack,
)
from loomserve.platform.request import SamplingParams
from loomserve.platform.stats import SchedulerStats
from loomserve.pooling.params import PoolingParams


def round_trip(request: EngineCoreRequest) -> EngineCoreRequest:
    back = unpack(pack(request))
    assert isinstance(back, EngineCoreRequest)
    return back


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


def test_calls_and_replies_come_back_as_their_own_types():
    lora = LoRARequest("sql", 3, "/adapters/sql")
    assert unpack(pack(AddLoRA(7, lora))) == AddLoRA(7, lora)
    assert unpack(pack(Abort(["a", "b"]))) == Abort(["a", "b"])
    assert unpack(pack(CallReply(7, "no such folder"))) == CallReply(7, "no such folder")


def test_outputs_keep_tokens_logprobs_pooled_vectors_and_stats():
    pooled = torch.tensor([0.25, -1.5, 3.0])
    outputs = EngineCoreOutputs(
        [EngineCoreOutput("g", [5, 6], [([5, 1], [-0.5, -2.0], 1), ([6], [-0.125], 1)], "stop", 6, 4),
         EngineCoreOutput("p", [], finish_reason="stop", pooled=pooled)],
        SchedulerStats(num_running=2, kv_cache_usage=0.5, prefix_cache_hits=16),
    )
    back = unpack(pack(outputs))
    g, p = back.outputs
    assert (g.new_token_ids, g.finish_reason, g.stop_reason, g.num_cached_tokens) == ([5, 6], "stop", 6, 4)
    assert [list(entry) for entry in g.new_logprobs] == [[[5, 1], [-0.5, -2.0], 1], [[6], [-0.125], 1]]
    assert torch.equal(p.pooled, pooled) and p.new_token_ids == []
    assert back.scheduler_stats == outputs.scheduler_stats

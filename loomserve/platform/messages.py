"""Typed messages between the front end and EngineCore, and their msgpack wire form."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import msgpack

from loomserve.adapters.request import LoRARequest
from loomserve.modalities.inputs import MultiModalItem
from loomserve.platform.request import SamplingParams
from loomserve.platform.stats import SchedulerStats
from loomserve.pooling.params import PoolingParams
from loomserve.pooling.wire import PooledWire


class MessageType(enum.IntEnum):
    ADD = 0
    ABORT = 1
    # Front end -> engine: "shutdown", or a call [method, call id, *args] (add_lora, remove_lora,
    # reset_prefix_cache); engine -> front end: the call's reply [call id, error or None].
    UTILITY = 2
    OUTPUTS = 3
    READY = 4
    ERROR = 5


@dataclass
class EngineCoreRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams | None  # None for a pooling request
    eos_token_id: int | None
    arrival_time: float
    cache_salt: str | None = None
    # What a request adds to plain generation, each None or empty when unused; new parts go last, here and on the
    # wire.
    lora_request: LoRARequest | None = None
    mm_items: list[MultiModalItem] = field(default_factory=list)
    pooling_params: PoolingParams | None = None  # set (and sampling_params None) for embedding / scoring requests

    def to_wire(self) -> list:
        sampling = None if self.sampling_params is None else self.sampling_params.to_dict()
        lora = None if self.lora_request is None else self.lora_request.to_wire()
        pooling = None if self.pooling_params is None else self.pooling_params.to_dict()
        return [self.request_id, self.prompt_token_ids, sampling, self.eos_token_id, self.arrival_time,
                self.cache_salt, lora, [item.to_wire() for item in self.mm_items], pooling]

    @classmethod
    def from_wire(cls, w: list) -> EngineCoreRequest:
        request_id, prompt_token_ids, sampling, eos_token_id, arrival_time, cache_salt, lora, mm_items, pooling = w
        return cls(
            request_id,
            prompt_token_ids,
            None if sampling is None else SamplingParams.from_dict(sampling),
            eos_token_id,
            arrival_time,
            cache_salt,
            lora_request=LoRARequest.from_wire(lora),
            mm_items=[MultiModalItem.from_wire(item) for item in mm_items],
            pooling_params=None if pooling is None else PoolingParams.from_dict(pooling),
        )


# Logprobs of one generated token: (token ids, logprobs, rank of the sampled token); sampled token first.
TokenLogprobs = tuple[list[int], list[float], int]


@dataclass
class EngineCoreOutput:
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    pooled: PooledWire | None = None  # a pooling request's output (loomserve.pooling.wire)

    def to_wire(self) -> list:
        return [self.request_id, self.new_token_ids, self.new_logprobs, self.finish_reason, self.stop_reason,
                self.num_cached_tokens, self.pooled]

    @classmethod
    def from_wire(cls, w: list) -> EngineCoreOutput:
        logprobs = [tuple(x) for x in w[2]] if w[2] is not None else None
        return cls(w[0], w[1], logprobs, w[3], w[4], w[5], w[6])


@dataclass
class EngineCoreOutputs:
    outputs: list[EngineCoreOutput] = field(default_factory=list)
    scheduler_stats: SchedulerStats | None = None

    def to_wire(self) -> list:
        stats = None if self.scheduler_stats is None else list(vars(self.scheduler_stats).values())
        return [[o.to_wire() for o in self.outputs], stats]

    @classmethod
    def from_wire(cls, w: list) -> EngineCoreOutputs:
        stats = None if w[1] is None else SchedulerStats(*w[1])
        return cls([EngineCoreOutput.from_wire(o) for o in w[0]], stats)


def pack(kind: MessageType, payload: Any) -> bytes:
    return msgpack.packb([int(kind), payload], use_bin_type=True)


def unpack(data: bytes) -> tuple[MessageType, Any]:
    kind, payload = msgpack.unpackb(data, raw=False, strict_map_key=False)
    return MessageType(kind), payload

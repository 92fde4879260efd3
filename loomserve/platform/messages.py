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


class MessageType(enum.IntEnum):
    ADD = 0
    ABORT = 1
    # Front end -> engine: "shutdown", "reset_prefix_cache", or a call [method, call id, *args] (add_lora,
    # remove_lora); engine -> front end: the call's reply [call id, error or None].
    UTILITY = 2
    OUTPUTS = 3
    READY = 4
    ERROR = 5


@dataclass
class EngineCoreRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None
    arrival_time: float
    cache_salt: str | None = None
    lora_request: LoRARequest | None = None
    mm_items: list[MultiModalItem] = field(default_factory=list)

    def to_wire(self) -> list:
        lora = None if self.lora_request is None else self.lora_request.to_wire()
        return [self.request_id, self.prompt_token_ids, self.sampling_params.to_dict(), self.eos_token_id,
                self.arrival_time, self.cache_salt, lora, [item.to_wire() for item in self.mm_items]]

    @classmethod
    def from_wire(cls, w: list) -> EngineCoreRequest:
        mm_items = [MultiModalItem.from_wire(item) for item in w[7]]
        return cls(w[0], w[1], SamplingParams.from_dict(w[2]), w[3], w[4], w[5], LoRARequest.from_wire(w[6]), mm_items)


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

    def to_wire(self) -> list:
        return [self.request_id, self.new_token_ids, self.new_logprobs, self.finish_reason, self.stop_reason,
                self.num_cached_tokens]

    @classmethod
    def from_wire(cls, w: list) -> EngineCoreOutput:
        logprobs = [tuple(x) for x in w[2]] if w[2] is not None else None
        return cls(w[0], w[1], logprobs, w[3], w[4], w[5])


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

"""Declared messages between the front end and EngineCore, and their wire form (`wire.py`, typed by name).

Front end -> engine: `EngineCoreRequest`, `Abort`, `Ping`, the typed engine calls (`AddLoRA`, `RemoveLoRA`,
`ResetPrefixCache`, `RefreshLoRAs`) and `Shutdown`. Engine -> front end: `EngineCoreOutputs`, `CallReply` (one per
call, once done, to the client that called), `LoRATable` (the adapters served, to every client when it changes) and
`EngineFailed`; `Ready` (or `EngineFailed`) goes once to the process that started the engine. Each front end (API
process) is one client of the engine, told apart by its socket's identity. In process (`LLM`) the same dataclasses
are passed as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from loomserve.adapters.request import LoRARequest
from loomserve.modalities.inputs import MultiModalItem
from loomserve.modalities.sent_items import SentMedia
from loomserve.platform.request import SamplingParams
from loomserve.platform.stats import SchedulerStats
from loomserve.platform.step import TokenLogprobs
from loomserve.pooling.params import PoolingParams


@dataclass
class EngineCoreRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams | None  # None for a pooling request
    eos_token_id: int | None
    arrival_time: float
    cache_salt: str | None = None
    # What a request adds to plain generation, each None or empty when unused.
    lora_request: LoRARequest | None = None
    mm_items: list[MultiModalItem] = field(default_factory=list)
    pooling_params: PoolingParams | None = None  # set (and sampling_params None) for embedding / scoring requests
    kv_transfer_params: dict[str, Any] | None = None  # disaggregated prefill/decode: what the KV connector reads
    mm_sent: SentMedia | None = None  # media items sent without tensors the engine holds (modalities/sent_items.py)


@dataclass
class Abort:
    request_ids: list[str]


@dataclass
class Shutdown:
    pass


@dataclass
class Ping:
    """Answered by the engine's next report: an idle engine's sign of life for the front end's health check."""


@dataclass
class AddLoRA:
    """Read an adapter (in the background) so that requests can name it; answered once read, or why not."""

    call_id: int
    lora: LoRARequest
    replace: bool = False  # an adapter already served under its name gives it up (else the name is refused)
    feature: ClassVar[str] = "lora"  # the runner hook that does it, and its method
    method: ClassVar[str] = "start_add"

    def args(self) -> list[Any]:
        return [self.lora.to_wire()]


@dataclass
class RemoveLoRA:
    """Forget an adapter; requests running with it finish first."""

    call_id: int
    lora_id: int
    feature: ClassVar[str] = "lora"
    method: ClassVar[str] = "remove"

    def args(self) -> list[Any]:
        return [self.lora_id]


@dataclass
class ResetPrefixCache:
    """Drop every cached KV block no request uses (the scheduler's own call)."""

    call_id: int


@dataclass
class RefreshLoRAs:
    """Send the caller the engine's `LoRATable` (before this call's reply): a front end that does not know an
    adapter's name asks before it says there is none (another API process may have loaded it)."""

    call_id: int


EngineCall = AddLoRA | RemoveLoRA | ResetPrefixCache | RefreshLoRAs


@dataclass
class LoRATable:
    """The adapters an engine serves, by name: the one table every API process serves from."""

    adapters: list[LoRARequest] = field(default_factory=list)


@dataclass
class CallReply:
    call_id: int
    error: str | None = None  # why the call failed; None: done


@dataclass
class Ready:
    """The engine has loaded the model and sized its KV cache."""


@dataclass
class EngineFailed:
    traceback: str


@dataclass
class EngineCoreOutput:
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None  # one entry per new token
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    pooled: torch.Tensor | None = None  # a pooling request's output (float32)
    kv_transfer_params: dict[str, Any] | None = None  # on a finished request: where a decode instance finds its KV
    prompt_logprobs: list[TokenLogprobs] | None = None  # of prompt tokens 1.. (asked for), with the first token


@dataclass
class EngineCoreOutputs:
    outputs: list[EngineCoreOutput] = field(default_factory=list)
    scheduler_stats: SchedulerStats | None = None


_MESSAGES: dict[str, type] = {cls.__name__: cls for cls in (
    EngineCoreRequest, Abort, Shutdown, Ping, AddLoRA, RemoveLoRA, ResetPrefixCache, RefreshLoRAs, CallReply, Ready,
    EngineFailed, EngineCoreOutputs, LoRATable,
)}


def pack(message: Any) -> bytes:
    from loomserve.platform import wire  # msgspec: only where a process boundary is crossed

    return wire.encode_tagged(message)


def unpack(data: bytes) -> Any:
    from loomserve.platform import wire

    return wire.decode_tagged(data, _MESSAGES)

"""What both generation routes share: the model check, per-prompt budgets, deltas and usage."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field

from loomserve.adapters.registry import UnknownLoRAError
from loomserve.adapters.request import LoRARequest
from loomserve.api.errors import APIError
from loomserve.api.logprobs import check_max_logprobs
from loomserve.api.prompts import Prompt, resolve_max_tokens
from loomserve.api.protocol import SamplingRequest
from loomserve.api.streaming import merge_async_iterators
from loomserve.platform.async_llm import AsyncLLM
from loomserve.platform.request import CompletionOutput, Logprob, RequestOutput, SamplingParams


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def lora_for(engine: AsyncLLM, model: str | None) -> tuple[LoRARequest | None, str]:
    """The adapter a request names in `model` (None: the base model) and the name its response carries; 404 unless
    `model` is absent or names the served model or one of its loaded adapters. An adapter whose folder is gone
    (the engine could not read it again once evicted from its caches) is unloaded, with a 404 that says so."""
    lora = engine.loras.get(model)
    served = engine.model_config.served_model_name
    if model and model not in (served, *engine.model_config.served_model_aliases) and lora is None:
        raise APIError(f"The model `{model}` does not exist.", status=404, param="model")
    if lora is not None and not os.path.isdir(lora.lora_path):
        with contextlib.suppress(UnknownLoRAError):  # a concurrent request unloaded it first
            await engine.remove_lora(lora.lora_name)
        raise APIError(f"The adapter `{model}` can no longer be served: its files are gone from the server, so it "
                       "has been unloaded", status=404, param="model")
    return lora, lora.lora_name if lora is not None else served


def sampling_params(engine: AsyncLLM, request: SamplingRequest, prompt: Prompt) -> SamplingParams:
    """The prompt's SamplingParams; 400 when the prompt plus completion overflow the context."""
    max_model_len = engine.model_config.max_model_len
    max_tokens = resolve_max_tokens(len(prompt.token_ids), request.requested_max_tokens, max_model_len)
    check_max_logprobs(request, engine.model_config)
    try:
        params = request.to_sampling_params(max_tokens)
        engine.input_processor.validate_constraints(params)
        return params
    except ValueError as exc:
        raise APIError(str(exc)) from exc


@dataclass
class Delta:
    """What one choice gained since the last chunk."""

    text: str
    offset: int  # characters of this choice sent before `text`
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    first: bool
    finish_reason: str | None
    stop_reason: int | str | None

    @classmethod
    def whole(cls, output: CompletionOutput) -> Delta:
        """A whole output as one delta, for answers that are not streamed."""
        return cls(
            output.text, 0, output.token_ids, output.logprobs, True, output.finish_reason, output.stop_reason
        )


@dataclass
class DeltaTracker:
    """Turns the engine's cumulative outputs into per-choice deltas (one tracker per response)."""

    _sent: dict[int, tuple[int, int]] = field(default_factory=dict)  # choice -> (chars, tokens) sent
    _finished: set[int] = field(default_factory=set)

    def delta(self, choice: int, output: CompletionOutput) -> Delta | None:
        """None when the choice has nothing new to say (finished already, or no text and no tokens)."""
        if choice in self._finished:
            return None
        first = choice not in self._sent
        chars, tokens = self._sent.get(choice, (0, 0))
        text, token_ids = output.text[chars:], output.token_ids[tokens:]
        if not (text or token_ids or output.finish_reason):
            return None  # a choice that has not started yet (n > 1: another choice's output) is not a chunk
        self._sent[choice] = (len(output.text), len(output.token_ids))
        if output.finish_reason:
            self._finished.add(choice)
        logprobs = output.logprobs[tokens:] if output.logprobs is not None else None
        return Delta(text, chars, token_ids, logprobs, first, output.finish_reason, output.stop_reason)


async def collect_final(streams: list[AsyncGenerator[RequestOutput, None]]) -> list[RequestOutput]:
    """Run engine streams to the end; their final outputs, in order."""
    finals: dict[int, RequestOutput] = {}
    async with aclosing(merge_async_iterators(*streams)) as merged:
        async for i, output in merged:
            finals[i] = output
    return [finals[i] for i in range(len(streams))]

"""The offline Python API in vLLM's shape: `LLM(model).generate(prompts, SamplingParams(...))`, `.chat(...)`;
`.embed(...)`, `.score(...)`, `.classify(...)` and `.encode(...)` for pooling models (loomserve/pooling/llm_api.py).

It drives an EngineCore in this process; the HTTP server uses the same pieces through AsyncLLM.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any, TypeVar

from loomserve.adapters.request import LoRARequest
from loomserve.modalities.chat import render_chat_with_media, split_media
from loomserve.platform.beam_search import BeamSearch, BeamSearchBatch, BeamSearchOutput, BeamSearchParams
from loomserve.platform.config import EngineArgs
from loomserve.platform.engine import EngineCore
from loomserve.platform.gc_heap import frozen_heap
from loomserve.platform.input_processor import InputProcessor, PromptType, cache_salt_of, load_tokenizer
from loomserve.platform.output_processor import OutputProcessor
from loomserve.platform.request import RequestOutput, SamplingParams
from loomserve.platform.threads import apply_engine_threads
from loomserve.pooling.llm_api import PoolingAPI

T = TypeVar("T")

Conversation = list[dict[str, Any]]


class LLM(PoolingAPI):
    def __init__(self, model: str, **engine_args: Any) -> None:
        unknown = set(engine_args) - EngineArgs.field_names()
        if unknown:
            raise TypeError(f"unknown engine arguments: {', '.join(sorted(unknown))}")
        args = EngineArgs(model=model, **engine_args)
        self.config = args.create_engine_config()
        if self.config.parallel_config.data_parallel_size > 1:
            raise ValueError("LLM drives one engine in this process: serve data_parallel_size > 1 with "
                             "`loomserve serve` (or AsyncLLM)")
        if self.config.model_config.device.type == "cpu":
            apply_engine_threads(args.cpu_threads)
        self.tokenizer = load_tokenizer(self.config.model_config)
        self.input_processor = InputProcessor(self.config.model_config, self.tokenizer, self.config.mm_config)
        self.engine = EngineCore(self.config)
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Run prompts to completion; outputs come back in the order of the prompts. `lora_request`: one
        adapter for all prompts or one (or None, the base model) per prompt. A dict prompt's "cache_salt" keeps its
        prefix-cache blocks apart from other salts'."""
        prompts = _as_prompt_list(prompts)
        params = _per_prompt(sampling_params or SamplingParams(), SamplingParams, "sampling params", len(prompts))
        loras = _per_prompt(lora_request, LoRARequest, "LoRA requests", len(prompts))
        tokenized = [self.input_processor.process(prompt) for prompt in prompts]
        for (_, token_ids, mm_items), p in zip(tokenized, params):
            self.input_processor.validate(token_ids, p, mm_items)  # all or nothing: refuse before any request starts
        for lora in dict.fromkeys(lora for lora in loras if lora is not None):
            self.engine.add_lora(lora)  # reads and checks the adapter, raising before any request starts
        processor = OutputProcessor(self.tokenizer, final_only=True)
        order = []
        for prompt, (text, token_ids, mm_items), p, lora in zip(prompts, tokenized, params, loras):
            request_id = str(next(self._ids))
            order.append(request_id)
            for child_id, child_params in processor.add_request(request_id, text, token_ids, p, time.time()):
                request = self.input_processor.engine_request(
                    child_id, token_ids, child_params, mm_items=mm_items, lora_request=lora,
                    cache_salt=cache_salt_of(prompt),
                )
                self.engine.add_request(request)
        return self._run(processor, order)

    def beam_search(
        self,
        prompts: PromptType | Sequence[PromptType],
        params: BeamSearchParams,
        lora_request: LoRARequest | None = None,
    ) -> list[BeamSearchOutput]:
        """vLLM's `LLM.beam_search`: the `beam_width` best continuations of each prompt, best first, searched one
        token at a time over the engine (platform/beam_search.py)."""
        eos, max_len = self.input_processor.eos_token_id, self.config.model_config.max_model_len
        batch = BeamSearchBatch([BeamSearch(self.input_processor.tokenize(p)[1], params, eos, max_len)
                                 for p in _as_prompt_list(prompts)])
        step_params = params.step_params()
        while not batch.done:
            outputs = self.generate(batch.prompts(), step_params, lora_request)
            batch.advance([output.outputs[0].logprobs[0] for output in outputs])
        return [search.output(self.tokenizer) for search in batch.searches]

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        """Render each conversation with the chat template (the tokenizer's, or `chat_template`; `tools` go to it
        as transformers passes them; `continue_final_message` extends the last assistant message instead of
        opening a new one), load its media parts, then generate."""
        if add_generation_prompt and continue_final_message:
            raise ValueError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        template_kwargs = {**(chat_template_kwargs or {}), "continue_final_message": continue_final_message}
        if tools:
            template_kwargs["tools"] = tools
        if chat_template is not None:
            template_kwargs["chat_template"] = chat_template
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self._chat_prompt(conv, add_generation_prompt, template_kwargs) for conv in conversations]
        return self.generate(prompts, sampling_params, lora_request)

    def _chat_prompt(
        self, conversation: Conversation, add_generation_prompt: bool, template_kwargs: dict[str, Any] | None
    ) -> dict[str, Any]:
        conversation, refs = split_media(conversation)
        mm = self.input_processor.mm
        text = render_chat_with_media(
            self.tokenizer, conversation, refs, mm.processor, add_generation_prompt, template_kwargs
        )
        prompt = {"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)}
        if refs:
            prompt["multi_modal_data"] = mm.load(refs)
        return prompt

    def _run(self, processor: OutputProcessor, order: list[str]) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        with frozen_heap():  # collections while stepping walk only the requests' objects
            while processor.has_unfinished():
                processed = processor.process_outputs(self.engine.step().outputs)
                self.engine.abort_requests(processed.to_abort)
                for _, output in processed.request_outputs:
                    if output.finished:
                        finished[output.request_id] = output
        return [finished[i] for i in order]


def _as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], int):
        return [prompts]  # one prompt given as token ids
    return prompts


def _per_prompt(value: T | Sequence[T | None] | None, kind: type[T], what: str, n: int) -> list[T | None]:
    """One value for all n prompts, or a sequence of exactly one per prompt."""
    if value is None or isinstance(value, kind):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"got {len(values)} {what} for {n} prompts")
    return values

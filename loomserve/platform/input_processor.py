"""Prompts in, validated engine requests out: tokenization, length checks, end-of-sequence ids."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from typing import Any

from loomserve.adapters.request import LoRARequest
from loomserve.modalities.config import MultiModalConfig
from loomserve.modalities.frontend import MultiModalFrontend
from loomserve.modalities.inputs import MultiModalItem
from loomserve.platform.config import ModelConfig
from loomserve.platform.logit_constraints import check_logit_constraints, tokenize_bad_words
from loomserve.platform.messages import EngineCoreRequest
from loomserve.platform.models.registry import is_encoder_decoder
from loomserve.platform.prompt_embeds import prompt_embeds_input
from loomserve.platform.request import SamplingParams, resolve_num_logprobs
from loomserve.platform.skip_tokenizer import NoTokenizer, check_token_only
from loomserve.platform.structured.grammar import grammar_spec

ENCODER_DECODER_INPUT = ("a speech-to-text (Whisper) model takes one audio clip with each prompt: use "
                         "/v1/audio/transcriptions, or multi_modal_data={'audio': ...}")

# A prompt: text, token ids, or vLLM's dict form {"prompt": ...} / {"prompt_token_ids": [...]}, which may add
# {"multi_modal_data": {"image": ..., "video": ..., "audio": ...}} (one item or a list per modality) and a
# "cache_salt"; or {"prompt_embeds": tensor [seq_len, hidden]} in place of the token ids.
PromptType = str | list[int] | dict[str, Any]


def cache_salt_of(prompt: PromptType) -> str | None:
    """A dict prompt's "cache_salt" (vLLM's name), if any."""
    return prompt.get("cache_salt") if isinstance(prompt, dict) else None


def load_tokenizer(model_config: ModelConfig) -> Any:
    if model_config.skip_tokenizer_init:
        return NoTokenizer()
    from transformers import AutoTokenizer

    gguf_file = model_config.gguf_file if model_config.tokenizer == model_config.model else None
    return AutoTokenizer.from_pretrained(model_config.tokenizer, trust_remote_code=model_config.trust_remote_code,
                                         gguf_file=gguf_file)


def generation_eos_ids(model_path: str) -> list[int]:
    """End-of-sequence ids from generation_config.json, which chat checkpoints often set apart."""
    path = os.path.join(model_path, "generation_config.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        eos = json.load(f).get("eos_token_id")
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def first_out_of_vocabulary(token_ids: Sequence[int], vocab_size: int) -> int | None:
    """The first id that does not index the embedding table, if any."""
    if not token_ids or (min(token_ids) >= 0 and max(token_ids) < vocab_size):  # C-speed scan of the usual case
        return None
    return next(t for t in token_ids if not 0 <= t < vocab_size)


def check_vocabulary(token_ids: Sequence[int], vocab_size: int, what: str) -> None:
    """Token ids from a client must index the embedding table: anything else is the client's error."""
    bad = first_out_of_vocabulary(token_ids, vocab_size)
    if bad is not None:
        raise ValueError(f"token id {bad} in {what} is out of the vocabulary [0, {vocab_size})")


def check_num_logprobs(params: SamplingParams, max_logprobs: int, vocab_size: int) -> None:
    """ValueError naming the field when a request asks for more logprobs (-1: the vocabulary) than --max-logprobs
    allows (-1: no cap), as vLLM counts them."""
    cap = resolve_num_logprobs(max_logprobs, vocab_size)
    for name in ("logprobs", "prompt_logprobs"):
        asked = resolve_num_logprobs(getattr(params, name), vocab_size)
        if asked is not None and asked > cap:
            raise ValueError(f"{name}: {asked} logprobs requested; this server gives at most {cap} (--max-logprobs)")


class InputProcessor:
    def __init__(self, model_config: ModelConfig, tokenizer: Any, mm_config: MultiModalConfig | None = None) -> None:
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.mm = MultiModalFrontend(model_config, tokenizer, mm_config or MultiModalConfig())
        config_eos = getattr(model_config.text_config, "eos_token_id", None)
        self.eos_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config_eos
        extra = generation_eos_ids(model_config.model)
        self.extra_stop_ids = [i for i in extra if i != self.eos_token_id]
        self.encoder_decoder = is_encoder_decoder(model_config.architecture)  # every request brings its audio

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(prompt text if any, token ids) for any accepted prompt form."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        return None, list(prompt)

    def process(self, prompt: PromptType) -> tuple[str | None, list[int], list[MultiModalItem]]:
        """`tokenize`, then media placeholders expanded (MediaError for media the model cannot take)."""
        if isinstance(prompt, dict) and "prompt_embeds" in prompt:
            return (None, *prompt_embeds_input(self.model_config, prompt["prompt_embeds"]))
        text, token_ids = self.tokenize(prompt)
        mm_data = prompt.get("multi_modal_data") if isinstance(prompt, dict) else None
        return (text, *self.mm.apply(token_ids, mm_data)) if mm_data else (text, token_ids, [])

    def validate(self, token_ids: list[int], params: SamplingParams, mm_items: Sequence[MultiModalItem] = ()) -> None:
        """Raise ValueError with the numbers when a prompt cannot be served."""
        if params.prompt_logprobs is not None and any(item.is_prompt_embeds for item in mm_items):
            raise ValueError("prompt_logprobs is not supported with prompt_embeds: the prompt has no tokens")
        if self.model_config.task != "generate":
            raise ValueError(f"{self.model_config.served_model_name} is a pooling model ({self.model_config.task}): "
                             "it cannot generate text")
        max_len = self.model_config.max_model_len
        if not token_ids:
            raise ValueError("the prompt is empty")
        if len(token_ids) >= max_len:
            raise ValueError(
                f"This model's maximum context length is {max_len} tokens. However, your prompt has "
                f"{len(token_ids)} tokens, which leaves no room for a completion."
            )
        check_vocabulary(token_ids, self.model_config.vocab_size, "the prompt")
        self.validate_constraints(params)
        check_num_logprobs(params, self.model_config.max_logprobs, self.model_config.vocab_size)

    def validate_constraints(self, params: SamplingParams) -> None:
        """ValueError for token ids outside the vocabulary, or a schema, regex or grammar no backend reads."""
        check_logit_constraints(params, self.model_config.vocab_size)
        if self.model_config.skip_tokenizer_init:
            check_token_only(params)
        if params.structured_outputs is not None:
            grammar_spec(params.structured_outputs)

    def engine_request(
        self,
        request_id: str,
        token_ids: list[int],
        params: SamplingParams,
        *,
        mm_items: Sequence[MultiModalItem] = (),
        lora_request: LoRARequest | None = None,
        cache_salt: str | None = None,
    ) -> EngineCoreRequest:
        if params.bad_words and params.bad_words_token_ids is None:
            bad_words_token_ids = tokenize_bad_words(self.tokenizer, params.bad_words)
            params = dataclasses.replace(params, bad_words_token_ids=bad_words_token_ids)
        if self.encoder_decoder and len(mm_items) != 1:
            raise ValueError(ENCODER_DECODER_INPUT)
        if self.extra_stop_ids and not params.ignore_eos:
            params = SamplingParams.from_dict(
                {**params.to_dict(), "stop_token_ids": params.stop_token_ids + self.extra_stop_ids}
            )
        return EngineCoreRequest(
            request_id, token_ids, params, self.eos_token_id, time.time(), cache_salt=cache_salt,
            mm_items=list(mm_items), lora_request=lora_request,
        )

"""Request and response bodies of the OpenAI-compatible routes (pydantic models, OpenAI's field names)."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from loomserve.api.protocol_constraints import ConstraintFields
from loomserve.platform.request import SamplingParams


def _valid_unicode(value: Any) -> Any:
    """Validator for text bound for the tokenizer: JSON escapes can spell lone surrogates; it refuses them."""
    for text in value if isinstance(value, list) else [value]:
        if not isinstance(text, str):
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"the text is not valid Unicode ({exc.reason} at {exc.start})") from None
    return value


# Integers travel to the engine through msgpack, which holds at most 64 bits.
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
TokenId = Annotated[int, Field(ge=0, le=2**63 - 1)]
LogprobCount = Annotated[int, Field(ge=-1)]  # -1: the whole vocabulary; the server caps it (--max-logprobs)
# vLLM's `cache_salt`: prompts with different salts share no prefix-cache block (tenants cannot time each other's
# prompts through cache hits); it keys the first block of the prompt's chain.
CacheSalt = Annotated[str, Field(min_length=1, max_length=256)]

# Request fields passed to SamplingParams under the same name when the client sets them.
_SAMPLING_FIELDS = (
    "n", "temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids", "seed", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "min_tokens", "ignore_eos", "include_stop_str_in_output",
    "skip_special_tokens", "best_of",
)


class OpenAIBaseModel(BaseModel):
    # A field this server does not implement answers 400 naming it (unsupported_fields.py), never silently nothing.
    # NaN and Infinity are not numbers.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _DropsNone(OpenAIBaseModel):
    """Serialized without its None fields, as OpenAI leaves them out of stream chunks."""

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


# ---------------------------------------------------------------- errors


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


# ---------------------------------------------------------------- requests


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = True  # vLLM's default: `stream_options: {}` asks for the usage chunk
    continuous_usage_stats: bool | None = False  # usage in every chunk too


class ContentPart(BaseModel):
    """One part of a message's content: `text`, or a media part (image_url, video_url, audio_url, input_audio) whose
    payload rides in the extra fields; multimodal models serve media parts, text-only ones refuse them (chat.py)."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None

    _unicode = field_validator("text")(_valid_unicode)


class ChatMessage(OpenAIBaseModel):
    # Other fields (tool_calls, tool_call_id, reasoning_content, ...) reach the chat template as given, as in vLLM.
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    _unicode = field_validator("role", "content", "name")(_valid_unicode)


# ---------------------------------------------------------------- tools


class FunctionDefinition(OpenAIBaseModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class ChatCompletionTool(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(OpenAIBaseModel):
    name: str


class NamedToolChoice(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatTemplateFields(OpenAIBaseModel):
    """What a request gives the chat template besides its messages (vLLM's fields)."""

    tools: list[ChatCompletionTool] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class SamplingRequest(OpenAIBaseModel, ConstraintFields):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    max_tokens: Int64 | None = None
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int64 | None = None
    min_p: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    seed: Int64 | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_tokens: Int64 | None = None
    ignore_eos: bool | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    kv_transfer_params: dict[str, Any] | None = None  # disaggregated prefill/decode, set by the proxy (vLLM's)
    cache_salt: CacheSalt | None = None
    # vLLM's logprob and search fields (api/logprobs.py, api/beam_search.py)
    prompt_logprobs: LogprobCount | None = None
    return_tokens_as_token_ids: bool = False
    return_token_ids: bool = False
    best_of: int | None = Field(None, ge=1, le=128)
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool = False

    _unicode = field_validator("stop")(_valid_unicode)

    @model_validator(mode="after")
    def _streams_what_it_can(self) -> SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("Stream options can only be defined when `stream=True`.")
        if self.stream and self.prompt_logprobs is not None:
            raise ValueError("`prompt_logprobs` are not available when `stream` is true")
        if self.stream and self.best_of is not None and self.best_of > self.n:
            raise ValueError("`best_of` above `n` cannot stream: the best candidates are known only at the end")
        return self

    @property
    def num_prompt_logprobs(self) -> int | None:
        return self.prompt_logprobs

    @property
    def num_sequences(self) -> int:
        """Sequences the engine runs per prompt: best_of candidates when more than n."""
        return max(self.n, self.best_of or 1)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return None

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        """Raises ValueError (from SamplingParams) for values out of range."""
        given = {name: getattr(self, name) for name in _SAMPLING_FIELDS}
        given = {name: value for name, value in given.items() if value is not None}
        return SamplingParams(max_tokens=max_tokens, logprobs=self.num_logprobs,
                              prompt_logprobs=self.num_prompt_logprobs, **given, **self.constraint_params())


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]] | None = None
    prompt_embeds: str | list[str] | None = None  # base64 of torch.save'd [seq_len, hidden] (--enable-prompt-embeds)
    logprobs: LogprobCount | None = None
    echo: bool = False

    _prompt_unicode = field_validator("prompt")(_valid_unicode)

    @model_validator(mode="after")
    def _needs_a_prompt(self) -> CompletionRequest:
        if self.prompt is None and self.prompt_embeds is None:
            raise ValueError("either `prompt` or `prompt_embeds` must be given")
        return self

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def num_prompt_logprobs(self) -> int | None:
        """An echoed prompt carries its tokens' logprobs when `logprobs` is set (as vLLM)."""
        if self.prompt_logprobs is None and self.echo:
            return self.logprobs
        return self.prompt_logprobs


class ChatCompletionRequest(SamplingRequest, ChatTemplateFields):
    messages: list[ChatMessage]
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    reasoning_effort: str | None = None  # passed to the chat template, as vLLM does
    include_reasoning: bool = True
    max_completion_tokens: Int64 | None = None
    logprobs: bool = False
    top_logprobs: LogprobCount | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("`top_logprobs` needs `logprobs` set to true")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(ChatTemplateFields):
    """Either a `prompt` or chat `messages` (rendered through the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    return_token_strs: bool = False  # vLLM's: each token's string beside its id

    _unicode = field_validator("prompt")(_valid_unicode)

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` and `messages`")
        return self


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[TokenId]


# ---------------------------------------------------------------- responses


class PromptTokensDetails(OpenAIBaseModel):
    cached_tokens: int = 0


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int | None) -> UsageInfo:
        """`cached_tokens` None: no `prompt_tokens_details` (shown only under --enable-prompt-tokens-details)."""
        details = PromptTokensDetails(cached_tokens=cached_tokens) if cached_tokens is not None else None
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=details,
        )


def _now() -> int:
    return int(time.time())


class CompletionLogProbs(OpenAIBaseModel):
    """An echoed prompt's first token has no logprob: None in `token_logprobs` and `top_logprobs`."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptLogprob(OpenAIBaseModel):
    """vLLM's `prompt_logprobs` entry of one token."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class CompletionChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None
    prompt_token_ids: list[int] | None = None  # return_token_ids (vLLM)
    token_ids: list[int] | None = None


class CompletionResponse(_DropsNone):
    """A whole answer, or (without usage until the last) one stream chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    kv_transfer_params: dict[str, Any] | None = None  # a prefill instance's answer: where the decode finds the KV


class ChatLogProb(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogProbsContent(ChatLogProb):
    top_logprobs: list[ChatLogProb] = Field(default_factory=list)


class ChatLogProbs(OpenAIBaseModel):
    content: list[ChatLogProbsContent] | None = None


class FunctionCall(OpenAIBaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(OpenAIBaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(_DropsNone):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_DropsNone):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class ChatResponseMessage(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    reasoning_content: str | None = None  # with --reasoning-parser; `reasoning` is vLLM's newer name for it
    reasoning: str | None = None


class ChatChoice(OpenAIBaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # return_token_ids (vLLM)


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    kv_transfer_params: dict[str, Any] | None = None  # a prefill instance's answer: where the decode finds the KV
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None
    prompt_token_ids: list[int] | None = None  # return_token_ids (vLLM)


class DeltaMessage(_DropsNone):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(OpenAIBaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # return_token_ids (vLLM)


class ChatCompletionStreamResponse(_DropsNone):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None  # return_token_ids (vLLM): in the first chunk


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "loomserve"
    root: str
    parent: str | None = None  # an adapter's base model
    max_model_len: int


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadLoRAAdapterRequest(OpenAIBaseModel):
    lora_name: str
    lora_path: str
    load_inplace: bool = False  # replace an adapter loaded under the same name (vLLM's)


class UnloadLoRAAdapterRequest(OpenAIBaseModel):
    lora_name: str


class TokenizeResponse(OpenAIBaseModel):
    tokens: list[int]
    count: int
    max_model_len: int
    token_strs: list[str] | None = None


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str

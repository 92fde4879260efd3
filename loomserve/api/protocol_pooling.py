"""Request and response bodies of the pooling routes: OpenAI embeddings, vLLM score, classify and pooling, the
Jina / Cohere rerank shape and Cohere's embed API v2 that vLLM serves."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from loomserve.api.protocol import CacheSalt, ChatMessage, OpenAIBaseModel, TokenId, _DropsNone, _valid_unicode


def _now() -> int:
    return int(time.time())


# ---------------------------------------------------------------- requests


PoolingInput = str | list[str] | list[TokenId] | list[list[TokenId]]
EmbedDType = Literal["float32", "float16", "bfloat16"]
Endianness = Literal["native", "big", "little"]


class PoolingRequest(OpenAIBaseModel):
    """Fields every pooling route takes (vLLM's extensions of OpenAI's embeddings body)."""

    model: str | None = None
    truncate_prompt_tokens: Annotated[int, Field(ge=-1)] | None = None  # -1: the model's context length
    user: str | None = None
    cache_salt: CacheSalt | None = None
    use_activation: bool | None = None  # classifiers: the head's activation; embeddings: L2 normalization


class InputOrMessages(PoolingRequest):
    """Either `input` or, as vLLM takes them, chat `messages` (rendered with the chat template; an image-text model
    without one embeds the text parts and images)."""

    input: PoolingInput | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for `input`, False for `messages` (the template has them)
    add_generation_prompt: bool = False

    _unicode = field_validator("input")(_valid_unicode)

    @model_validator(mode="after")
    def _input_or_messages(self) -> InputOrMessages:
        if (self.input is None) == (self.messages is None):
            raise ValueError("give exactly one of `input` and `messages`")
        return self


class EncodedRequest(InputOrMessages):
    """How vectors are sent back: JSON floats, base64 of `embed_dtype` in `endianness`, or vLLM's binary body."""

    encoding_format: Literal["float", "base64", "bytes", "bytes_only"] = "float"
    embed_dtype: EmbedDType = "float32"
    endianness: Endianness = "native"
    dimensions: int | None = None
    normalize: bool | None = None  # default: what the checkpoint says (a Normalize module)


class EmbeddingRequest(EncodedRequest):
    prompt_name: str | None = None  # one of the checkpoint's prompts (config_sentence_transformers.json)


class ClassificationRequest(InputOrMessages):
    pass


class PoolingAPIRequest(EncodedRequest):
    """POST /pooling: the model's raw pooled output for a `task` it serves (default: its own)."""

    task: Literal["embed", "classify", "token_embed", "token_classify", "score", "encode"] | None = None


class ScoreRequest(PoolingRequest):
    """Pairs as `text_1`/`text_2`, or vLLM's newer `queries`/`documents` (also `data_1`/`data_2`)."""

    text_1: str | list[str]
    text_2: str | list[str]
    max_tokens_per_query: Annotated[int, Field(ge=0)] = 0  # 0: no per-text truncation
    max_tokens_per_doc: Annotated[int, Field(ge=0)] = 0

    _unicode = field_validator("text_1", "text_2")(_valid_unicode)

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: object) -> object:
        if isinstance(data, dict) and "text_1" not in data:
            for first, second in (("queries", "documents"), ("queries", "items"), ("data_1", "data_2")):
                if first in data and second in data:
                    rest = {key: value for key, value in data.items() if key not in (first, second)}
                    return {**rest, "text_1": data[first], "text_2": data[second]}
        return data


class RerankDocument(OpenAIBaseModel):
    text: str

    _unicode = field_validator("text")(_valid_unicode)


class RerankRequest(PoolingRequest):
    query: str
    documents: list[str | RerankDocument]
    top_n: Annotated[int, Field(ge=0)] | None = None  # 0 or absent: every document
    return_documents: bool = True
    max_tokens_per_query: Annotated[int, Field(ge=0)] = 0  # 0: no per-text truncation
    max_tokens_per_doc: Annotated[int, Field(ge=0)] = 0

    _unicode = field_validator("query", "documents")(_valid_unicode)

    @property
    def document_texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


# ---------------------------------------------------------------- responses


class PoolingUsage(OpenAIBaseModel):
    prompt_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int) -> PoolingUsage:
        return cls(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens)


class PoolingListResponse(OpenAIBaseModel):
    """What every pooling endpoint's answer carries besides its `data`."""

    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=_now)
    model: str
    usage: PoolingUsage


class EmbeddingData(OpenAIBaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # a base64 string of embed_dtype values with encoding_format=base64


class EmbeddingResponse(PoolingListResponse):
    data: list[EmbeddingData]


class ClassificationData(OpenAIBaseModel):
    object: Literal["classification"] = "classification"
    index: int
    label: str | None
    probs: list[float]
    num_classes: int


class ClassificationResponse(PoolingListResponse):
    data: list[ClassificationData]


class ScoreData(OpenAIBaseModel):
    object: Literal["score"] = "score"
    index: int
    score: float


class ScoreResponse(PoolingListResponse):
    data: list[ScoreData]


class RerankResult(_DropsNone):
    index: int
    relevance_score: float
    document: RerankDocument | None = None  # left out unless return_documents


class PoolingData(OpenAIBaseModel):
    object: Literal["pooling"] = "pooling"
    index: int
    data: list[float] | list[list[float]] | str


class PoolingResponse(PoolingListResponse):
    data: list[PoolingData]


class RerankUsage(OpenAIBaseModel):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(OpenAIBaseModel):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]

"""Request and response bodies of the pooling routes: OpenAI embeddings, vLLM score and classify, and the
Jina / Cohere rerank shape that vLLM serves."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from loomserve.api.protocol import CacheSalt, ChatMessage, OpenAIBaseModel, TokenId, _DropsNone, _valid_unicode


def _now() -> int:
    return int(time.time())


# ---------------------------------------------------------------- requests


class PoolingRequest(OpenAIBaseModel):
    """Fields every pooling route takes (vLLM's extensions of OpenAI's embeddings body)."""

    model: str | None = None
    truncate_prompt_tokens: Annotated[int, Field(ge=-1)] | None = None  # -1: the model's context length
    user: str | None = None
    cache_salt: CacheSalt | None = None


class EmbeddingRequest(PoolingRequest):
    """Either `input` or, as vLLM takes them, chat `messages` (whose image_url parts an image-text model embeds)."""

    input: str | list[str] | list[TokenId] | list[list[TokenId]] | None = None
    messages: list[ChatMessage] | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    normalize: bool | None = None  # default: what the checkpoint says (a Normalize module)
    prompt_name: str | None = None  # one of the checkpoint's prompts (config_sentence_transformers.json)
    add_special_tokens: bool = True

    _unicode = field_validator("input")(_valid_unicode)

    @model_validator(mode="after")
    def _input_or_messages(self) -> EmbeddingRequest:
        if (self.input is None) == (self.messages is None):
            raise ValueError("give exactly one of `input` and `messages`")
        return self


class ClassificationRequest(PoolingRequest):
    input: str | list[str] | list[TokenId] | list[list[TokenId]]

    _unicode = field_validator("input")(_valid_unicode)


class ScoreRequest(PoolingRequest):
    text_1: str | list[str]
    text_2: str | list[str]

    _unicode = field_validator("text_1", "text_2")(_valid_unicode)


class RerankDocument(OpenAIBaseModel):
    text: str

    _unicode = field_validator("text")(_valid_unicode)


class RerankRequest(PoolingRequest):
    query: str
    documents: list[str | RerankDocument]
    top_n: Annotated[int, Field(ge=0)] | None = None  # 0 or absent: every document
    return_documents: bool = True

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
    embedding: list[float] | str  # a base64 string of little-endian float32 with encoding_format=base64


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


class RerankUsage(OpenAIBaseModel):
    total_tokens: int


class RerankResponse(OpenAIBaseModel):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]

"""Request and response bodies of Cohere's embed API v2 (POST /v2/embed), as vLLM serves it: `texts`, `images` or
mixed `inputs`, an `input_type` choosing the checkpoint's prompt, `embedding_types`, `truncate`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from loomserve.api.protocol import OpenAIBaseModel, _valid_unicode

CohereEmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]


class CohereImageURL(OpenAIBaseModel):
    url: str


class CohereContent(OpenAIBaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: CohereImageURL | None = None

    @model_validator(mode="after")
    def _payload(self) -> CohereContent:
        if (self.text if self.type == "text" else self.image_url) is None:
            raise ValueError(f"content of type {self.type} needs its `{self.type}`")
        return self


class CohereInput(OpenAIBaseModel):
    content: Annotated[list[CohereContent], Field(min_length=1)]


class CohereEmbedRequest(OpenAIBaseModel):
    model: str | None = None
    input_type: str | None = None  # search_query, search_document, classification, clustering, or a prompt's name
    texts: list[str] | None = None
    images: list[str] | None = None  # data URIs (or URLs the server may fetch)
    inputs: list[CohereInput] | None = None
    output_dimension: int | None = None
    embedding_types: Annotated[list[CohereEmbeddingType], Field(min_length=1)] = ["float"]
    truncate: Literal["NONE", "START", "END"] = "END"
    max_tokens: Annotated[int, Field(ge=1)] | None = None

    _unicode = field_validator("texts")(_valid_unicode)

    @model_validator(mode="after")
    def _one_input_field(self) -> CohereEmbedRequest:
        given = [value for value in (self.texts, self.images, self.inputs) if value is not None]
        if len(given) != 1 or not given[0]:
            raise ValueError("give exactly one of `texts`, `images` and `inputs`, not empty")
        return self


class CohereApiVersion(OpenAIBaseModel):
    version: str = "2"


class CohereBilledUnits(OpenAIBaseModel):
    input_tokens: int


class CohereMeta(OpenAIBaseModel):
    api_version: CohereApiVersion = Field(default_factory=CohereApiVersion)
    billed_units: CohereBilledUnits


class CohereEmbedResponse(OpenAIBaseModel):
    id: str
    embeddings: dict[str, list]  # embedding type -> one entry per input
    texts: list[str] | None = None
    meta: CohereMeta
    response_type: Literal["embeddings_by_type"] = "embeddings_by_type"

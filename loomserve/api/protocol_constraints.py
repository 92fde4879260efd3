"""Request fields that constrain what is sampled: OpenAI's `response_format` and `logit_bias`, vLLM's
`structured_outputs` object, its legacy `guided_*` fields, `allowed_token_ids` and `bad_words`.

Structured output may be asked for in one field only: two of them (say `response_format` and `guided_regex`) are
a conflict the client hears of (400), never one silently winning.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loomserve.platform.structured import StructuredOutputsParams

TokenId = Annotated[int, Field(ge=0, le=2**63 - 1)]
_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


class JsonSchemaFormat(BaseModel):
    """OpenAI's `response_format.json_schema`: the schema rides in `schema`."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(BaseModel):
    """vLLM's `structured_outputs` object: exactly one of json, regex, choice, grammar, json_object,
    structural_tag."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    json_schema: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict[str, Any] | None = None
    disable_any_whitespace: bool = False


class ConstraintFields(BaseModel):
    """The constraint fields /v1/completions and /v1/chat/completions share."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string, JSON's keys) -> bias in [-100, 100]
    allowed_token_ids: list[TokenId] | None = None
    bad_words: list[str] | None = None

    def constraint_params(self) -> dict[str, Any]:
        """SamplingParams' constraint fields the request sets; ValueError for a conflict or a malformed one."""
        params: dict[str, Any] = {
            "structured_outputs": self._structured_outputs(),
            "logit_bias": _logit_bias(self.logit_bias),
            "allowed_token_ids": self.allowed_token_ids,
            "bad_words": self.bad_words,
        }
        return {name: value for name, value in params.items() if value is not None}

    def _structured_outputs(self) -> StructuredOutputsParams | None:
        given = {name: params for name, params in (
            ("response_format", _from_response_format(self.response_format)),
            ("structured_outputs", _from_vllm(self.structured_outputs)),
            *((name, _from_guided(name, getattr(self, name))) for name in _GUIDED),
        ) if params is not None}
        if len(given) > 1:
            raise ValueError(f"structured output is asked for in {' and '.join(given)}: give one of them")
        return next(iter(given.values()), None)


def _from_response_format(fmt: ResponseFormat | None) -> StructuredOutputsParams | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if fmt.json_schema is None or fmt.json_schema.json_schema is None:
        raise ValueError("response_format json_schema needs `json_schema.schema`")
    return StructuredOutputsParams(json=fmt.json_schema.json_schema)


def _from_vllm(request: StructuredOutputsRequest | None) -> StructuredOutputsParams | None:
    if request is None:
        return None
    tag = request.structural_tag
    return StructuredOutputsParams(
        json=request.json_schema, regex=request.regex, choice=request.choice, grammar=request.grammar,
        json_object=request.json_object, structural_tag=tag if tag is None or isinstance(tag, str) else _json(tag),
        disable_any_whitespace=request.disable_any_whitespace,
    )


def _from_guided(name: str, value: Any) -> StructuredOutputsParams | None:
    if value is None:
        return None
    return StructuredOutputsParams(**{name.removeprefix("guided_"): value})


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    if bias is None:
        return None
    try:
        return {int(token): value for token, value in bias.items()}
    except ValueError:
        raise ValueError("logit_bias keys must be token ids") from None


def _json(value: Any) -> str:
    import json

    return json.dumps(value)

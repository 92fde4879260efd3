"""The OpenAPI schema as the server really answers: bad bodies are 400 (not FastAPI's 422) with the OpenAI error
shape, every body route may answer 413 and the generation and pooling routes 429; the description states the
server's limits."""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from loomserve.api.limits import ServerLimits
from loomserve.api.protocol import ErrorResponse

_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_BODY_ERRORS = {
    "400": "The request is malformed or over a limit (the message says which)",
    "413": "The request body is over --max-request-body-bytes",
    "503": "The engine is not running or not answering",
}
_QUEUED = {"429": "The model's queue is full (--max-queued-requests); retry after Retry-After seconds"}
# the routes that hold engine requests, under admission control
_ADMITTED = {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/classify", "/v1/score", "/rerank",
             "/v1/rerank", "/v2/rerank", "/score", "/pooling", "/v2/embed", "/invocations"}


def install_openapi(app: FastAPI, limits: ServerLimits) -> None:
    """Make `app.openapi()` build the schema below (once, on first use)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _schema(app, limits)
        return app.openapi_schema

    app.openapi = openapi


def _schema(app: FastAPI, limits: ServerLimits) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes, description=_describe(limits))
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            responses = operation["responses"]
            if responses.pop("422", None) is None:
                continue  # no body: nothing to validate
            errors = {**_BODY_ERRORS, **(_QUEUED if path in _ADMITTED else {})}
            responses.update({code: _error(text) for code, text in errors.items()})
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(error_schema.pop("$defs", {}))
    components["ErrorResponse"] = error_schema
    return schema


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR_REF}}}


def _describe(limits: ServerLimits) -> str:
    rows = "\n".join(f"- `--{f.name.replace('_', '-')}`: {getattr(limits, f.name)}"
                     for f in dataclasses.fields(limits))
    return f"OpenAI-compatible serving. This server's limits:\n\n{rows}"

"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with a matching status."""

from __future__ import annotations

from http import HTTPStatus

from fastapi.responses import JSONResponse

from loomserve.api.protocol import ErrorInfo, ErrorResponse
from loomserve.platform.async_llm import EngineDeadError

_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    413: "RequestTooLargeError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """A request the server answers with an error status instead of a result."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.headers = headers  # e.g. Retry-After on a 429


def error_body(status: int, message: str, param: str | None = None) -> ErrorResponse:
    kind = _ERROR_TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "") + "Error"
    return ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=status))


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param).model_dump(), status_code=status)


def exception_response(exc: Exception) -> JSONResponse:
    body = error_body_for(exc)
    headers = exc.headers if isinstance(exc, APIError) else None
    return JSONResponse(body.model_dump(), status_code=body.error.code, headers=headers)


def error_body_for(exc: Exception) -> ErrorResponse:
    """The error a client gets for `exc`: its own status for an APIError, 503 for a dead engine, else 500."""
    if isinstance(exc, APIError):
        return error_body(exc.status, exc.message, exc.param)
    if isinstance(exc, EngineDeadError):
        return error_body(503, "The engine is not running, so this server cannot serve requests now")
    return error_body(500, f"Internal server error ({type(exc).__name__}); see the server log")

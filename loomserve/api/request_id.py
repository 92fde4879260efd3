"""`--enable-request-id-headers`: every response carries `X-Request-Id`, the client's own or a new one (vLLM's)."""

from __future__ import annotations

import uuid

from starlette.types import Scope

from loomserve.api.response_headers import Headers, request_header

HEADER = b"x-request-id"


def request_id_headers(scope: Scope) -> Headers:
    given = request_header(scope, HEADER)
    return [(HEADER, (given or uuid.uuid4().hex).encode("latin-1"))]

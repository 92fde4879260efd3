"""The API's documentation as the server behaves: the OpenAPI schema names the 400 (OpenAI-shaped error body) the
server answers for an invalid request, not FastAPI's 422; `--enable-offline-docs` serves /docs with Swagger UI's
assets from the `swagger-ui-bundle` package, so it renders on a host without internet."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse

_ERROR_SCHEMA = {
    "type": "object",
    "properties": {"error": {"type": "object", "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": "string", "nullable": True},
        "code": {"type": "integer"}}}},
}
_ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")


def openapi_with_real_errors(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema with each 422 response replaced by the 400 the server sends; built once."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                if responses.pop("422", None) is not None:
                    responses["400"] = {"description": "Invalid request (OpenAI-style error body)",
                                        "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
        schema.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
        app.openapi_schema = schema
    return app.openapi_schema


def swagger_assets_folder() -> str:
    """The installed Swagger UI's folder; ValueError saying what to install when it is not."""
    try:
        import swagger_ui_bundle
    except ImportError:
        raise ValueError("--enable-offline-docs needs the Swagger UI assets: pip install swagger-ui-bundle") from None
    return swagger_ui_bundle.swagger_ui_path


def offline_docs_router() -> APIRouter:
    folder = swagger_assets_folder()
    router = APIRouter(include_in_schema=False)

    @router.get("/docs")
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title="loomserve",
                                   swagger_js_url=f"{root}/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}/docs-assets/swagger-ui.css",
                                   swagger_favicon_url=f"{root}/docs-assets/favicon-32x32.png")

    @router.get("/docs-assets/{name}")
    async def asset(name: str) -> FileResponse:
        if name not in _ASSETS:
            raise HTTPException(404, f"no docs asset {name!r}")
        return FileResponse(f"{folder}/{name}")

    return router

"""`--enable-offline-docs`: /docs served with Swagger UI's assets from the `swagger-ui-bundle` package, so it renders
on a host without internet (the schema itself is api/openapi.py's)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

_ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")


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

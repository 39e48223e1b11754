"""The web application: dashboard pages, the JSON API (``/api/v1``, OpenAPI at ``/docs``) and the
datagrepper-compatible ``/raw`` and ``/id``. Read-only: every route is a GET.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from fedimg import __version__
from fedimg.web import api, datagrepper, pages
from fedimg.web.context import WebContext

STATIC_DIR = Path(__file__).parent / "static"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The dashboard loads nothing from elsewhere and runs no inline code.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
#: /docs: Swagger UI is served from here too (fastapi-offline), but FastAPI's page starts it
#: with an inline script and Swagger UI sets inline styles.
DOCS_CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self' 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'self'"
)
DOCS_ASSETS = "/docs-assets"
_SLASHES = re.compile(r"/{2,}")


class NormalisePath:
    """``//raw`` and ``/raw/`` are ``/raw``: repeated slashes collapse, a trailing one goes.

    datagrepper tolerates both, and scripts that join a base URL ending in ``/`` with ``/raw``
    send them.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            # Behind a proxy (--root-path) the path starts with the prefix; "/" under it stays.
            root = str(scope.get("root_path", "")).rstrip("/")
            route = path[len(root) :] if root and path.startswith(root) else path
            route = _SLASHES.sub("/", route)
            if len(route) > 1:
                route = route.rstrip("/")
            clean = (root if path.startswith(root) else "") + (route or "/")
            if clean != path:
                scope = dict(scope)
                scope["path"] = clean
                scope["raw_path"] = clean.encode()
        await self.app(scope, receive, send)


class SecurityHeaders:
    """No sniffing, no framing, no referrer; a strict CSP on the dashboard's pages."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope["path"]).removeprefix(str(scope.get("root_path", "")).rstrip("/"))
        policy = DOCS_CONTENT_SECURITY_POLICY if path == "/docs" else CONTENT_SECURITY_POLICY

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                ]
                content_type = dict(headers).get(b"content-type", b"")
                if content_type.startswith(b"text/html"):
                    headers.append((b"content-security-policy", policy.encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _validation_error(request: Request, exc: Exception) -> Response:
    """datagrepper's paths answer bad values with 400; the API keeps FastAPI's 422."""
    assert isinstance(exc, RequestValidationError)
    path = request.url.path.removeprefix(request.scope.get("root_path", "").rstrip("/"))
    if path in datagrepper.DATAGREPPER_PATHS:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc'][1:])}: {error['msg']}"
            for error in exc.errors()
        )
        return JSONResponse({"error": "bad_request", "detail": problems}, status_code=400)
    return await request_validation_exception_handler(request, exc)


async def _http_error(_request: Request, exc: Exception) -> Response:
    """Errors as ``{"error": "not_found", "detail": ...}`` (datagrepper's shape)."""
    assert isinstance(exc, StarletteHTTPException)
    slug = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
    return JSONResponse(
        {"error": slug, "detail": exc.detail},
        status_code=exc.status_code,
        headers=exc.headers,
    )


def _drop_validation_responses(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """The OpenAPI schema, with datagrepper's paths documenting 400 instead of 422."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for path in datagrepper.DATAGREPPER_PATHS:
                for operation in schema["paths"].get(path, {}).values():
                    operation.get("responses", {}).pop("422", None)
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def create_app(context: WebContext) -> FastAPI:
    """The application over ``context.catalog``."""
    # FastAPIOffline: FastAPI whose /docs loads Swagger UI from files of its own, not a CDN.
    app = FastAPIOffline(
        static_url=DOCS_ASSETS,
        title="fedimg",
        version=__version__,
        summary="Jobs, AMIs and messages of fedimg, read-only.",
        description=(
            "The JSON API (`/api/v1`) and a datagrepper-compatible message history (`/raw`, "
            "`/id`) over fedimg's catalog. Everything is read-only."
        ),
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.web = context
    app.include_router(api.router)
    app.include_router(datagrepper.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    # Scripts in browsers read the API and /raw like datagrepper's (public, read-only data).
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["GET"])
    app.add_middleware(SecurityHeaders)
    app.add_middleware(NormalisePath)
    app.openapi = _drop_validation_responses(app)  # type: ignore[method-assign]
    return app

"""`build_api`: the REST control plane as one plain ASGI app (Starlette routing, no middleware)."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from corral.core.settings import Settings
from corral.server.api._auth import ApiKeyAuth, ApiKeyLookup
from corral.server.api._errors import EXCEPTION_HANDLERS
from corral.server.api._sandboxes import SandboxRoutes
from corral.server.api._service import SandboxServiceProtocol
from corral.server.api._templates import TemplateRoutes, TemplateServiceProtocol

__all__ = ["build_api"]


async def _health(_request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def build_api(
    service: SandboxServiceProtocol,
    store: ApiKeyLookup,
    settings: Settings,
    templates: TemplateServiceProtocol | None = None,
) -> ASGIApp:
    """The E2B-compatible REST API. `store` authenticates API keys (a `Store` will do).

    `GET /health` and the pre-signed `PUT /upload/{token}` need no key; every other route requires
    `X-API-Key`. Template routes come first (`/templates/tags` must not be taken for a template
    id); their `DELETE /templates/{id}` hands ids the builder did not make to the sandbox
    service's `delete_snapshot`.
    """
    auth = ApiKeyAuth(store, key_file=settings.home / "api_key")
    sandboxes = SandboxRoutes(service, auth, domain=settings.domain)
    template_routes = (
        TemplateRoutes(templates, auth, delete_other=getattr(service, "delete_snapshot", None)).routes()
        if templates is not None
        else []
    )
    return Starlette(
        routes=[Route("/health", _health, methods=["GET"]), *template_routes, *sandboxes.routes()],
        exception_handlers=EXCEPTION_HANDLERS,
    )

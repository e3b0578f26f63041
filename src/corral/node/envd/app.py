"""The envd ASGI app the proxy hands sandbox requests for port 49983 to.

Paths: `/process.Process/*` and `/filesystem.Filesystem/*` (Connect), `/files`, `/health`, `/envs`,
`/metrics`. Every request carries the sandbox in `scope[SCOPE_KEY]` and the `e2b-sandbox-id` header.
The access token is enforced here, except for the paths envd leaves open (`/health`, and `/files`,
which checks the token or a signature itself).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Mapping

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from corral.node.envd.context import EnvdSandbox, sandbox_from_scope
from corral.node.envd.files_http import get_file, post_files
from corral.node.envd.filesystem import FilesystemService
from corral.node.envd.metrics import metrics
from corral.node.envd.process import ProcessService
from corral.node.envd.users import lookup_user
from corral.spec._generated.filesystem.filesystem_connect import FilesystemASGIApplication
from corral.spec._generated.process.process_connect import ProcessASGIApplication
from corral.spec.envd import envd_codecs

__all__ = ["UNAUTHORIZED_MESSAGE", "build_envd_app"]

UNAUTHORIZED_MESSAGE = "unauthorized access, please provide a valid access token or method signing if supported"
_OPEN_PATHS = ("/health", "/files")
_MAX_RPC_BYTES = 64 * 1024 * 1024


async def _health(request: Request) -> Response:
    return Response(status_code=204)


async def _envs(request: Request) -> Response:
    return JSONResponse(sandbox_from_scope(request.scope).default_env())


def build_envd_app(lookup: Callable[[Mapping[str, str]], EnvdSandbox]) -> ASGIApp:
    """`lookup(headers)` finds the sandbox of a Connect call by its `e2b-sandbox-id` header."""
    process_app = ProcessASGIApplication(
        ProcessService(lookup, lookup_user), codecs=envd_codecs(), read_max_bytes=_MAX_RPC_BYTES
    )
    filesystem_app = FilesystemASGIApplication(
        FilesystemService(lookup), codecs=envd_codecs(), read_max_bytes=_MAX_RPC_BYTES
    )
    http_app = Starlette(
        routes=[
            Route("/health", _health, methods=["GET"]),
            Route("/files", get_file, methods=["GET"]),
            Route("/files", post_files, methods=["POST"]),
            Route("/envs", _envs, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ]
    )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        sandbox = sandbox_from_scope(scope)
        if sandbox.access_token is not None and path not in _OPEN_PATHS:
            token = _header(scope, b"x-access-token")
            if token is None or not hmac.compare_digest(token.encode(), sandbox.access_token.encode()):
                body = json.dumps({"code": 401, "message": UNAUTHORIZED_MESSAGE}).encode()
                await send({"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                return
        if path.startswith("/process.Process/"):
            await process_app(scope, receive, send)
        elif path.startswith("/filesystem.Filesystem/"):
            await filesystem_app(scope, receive, send)
        else:
            await http_app(scope, receive, send)

    return app


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return None



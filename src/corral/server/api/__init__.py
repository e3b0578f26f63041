"""The E2B-compatible REST control plane (e2b-protocol.md §2.1).

    app = build_api(service, store, settings)     # a plain ASGI app

Handlers only translate: parse the request into a typed command (`CreateSandboxRequest`,
`SandboxQuery`, ints and bools), call one `SandboxServiceProtocol` method, serialise the `SandboxRow`
it returns. Errors use E2B's body `{"code": <http status>, "message": ...}`.
"""

from corral.server.api._app import build_api
from corral.server.api._auth import ApiKeyLookup
from corral.server.api._body import MAX_JSON_BODY
from corral.server.api._service import CreateSandboxRequest, SandboxServiceProtocol
from corral.server.api._wire import listed_sandbox_json, rfc3339, sandbox_detail_json, sandbox_json

__all__ = [
    "MAX_JSON_BODY",
    "ApiKeyLookup",
    "CreateSandboxRequest",
    "SandboxServiceProtocol",
    "build_api",
    "listed_sandbox_json",
    "rfc3339",
    "sandbox_detail_json",
    "sandbox_json",
]

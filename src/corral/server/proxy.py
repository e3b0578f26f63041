"""Sandbox traffic on the shared port: find the sandbox and port a request is for, then serve it.

Routing (pure, `route_target`): Host `{port}-{sandboxID}.{domain}` first, else the headers
`E2b-Sandbox-Id` + `E2b-Sandbox-Port`. Port 49983 goes to the node's envd app; any other port is
reverse-proxied to that port inside the sandbox. Unknown or dead sandboxes answer 502 (the SDK's
`is_running()` reads 502 as "not running"). When a sandbox ends mid-request its envd streams are cut
at the transport level, as a dying VM would cut them, so clients see a dropped connection.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import httpx
from starlette.types import ASGIApp, Receive, Scope, Send

from corral.core.ids import is_sandbox_id
from corral.core.sandbox import ENVD_PORT
from corral.node.envd.context import SCOPE_KEY
from corral.node.envd.process import SandboxGone

__all__ = ["route_target", "SandboxProxy", "INTERNAL_ENVD_PATHS"]

log = logging.getLogger(__name__)

# envd paths only the orchestrator may call; never reachable from outside.
INTERNAL_ENVD_PATHS = frozenset({"/init", "/freeze", "/unfreeze", "/collapse", "/fsfreeze", "/fsthaw"})
_HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"te",
    b"trailers",
    b"transfer-encoding",
    b"upgrade",
    b"host",
}


def route_target(headers: Mapping[str, str], domain: str) -> tuple[str, int] | None:
    """(sandbox id, port) a request is for, or None when it is for the control plane."""
    host = headers.get("host", "").split(":", 1)[0].lower()
    suffix = "." + domain.lower()
    if host.endswith(suffix):
        label = host[: -len(suffix)]
        port, sep, sandbox_id = label.partition("-")
        if sep and port.isdigit() and "." not in sandbox_id and is_sandbox_id(sandbox_id):
            return sandbox_id, int(port)
    sandbox_id = headers.get("e2b-sandbox-id")
    if sandbox_id is not None:
        port_text = headers.get("e2b-sandbox-port", str(ENVD_PORT))
        return sandbox_id, int(port_text) if port_text.isdigit() else -1
    return None


def scope_headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


async def send_json(send: Send, status: int, body: Any) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})


class SandboxProxy:
    def __init__(self, node: Any, envd_app: ASGIApp) -> None:
        self.node = node
        self.envd_app = envd_app
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0), follow_redirects=False)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send, target: tuple[str, int]) -> None:
        sandbox_id, port = target
        if sandbox_id not in self.node:
            await send_json(send, 502, {"sandboxId": sandbox_id, "message": "The sandbox was not found", "code": 502})
            return
        handle = self.node.get(sandbox_id)
        if port == ENVD_PORT:
            await self._envd(handle, scope, receive, send)
        elif 0 < port < 65536:
            await self._forward(handle, port, scope, receive, send)
        else:
            await send_json(send, 400, {"code": 400, "message": f"invalid sandbox port '{port}'"})

    async def _envd(self, handle: Any, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] in INTERNAL_ENVD_PATHS:
            await send_json(send, 404, {"code": 404, "message": "not found"})
            return
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"e2b-sandbox-id"]
        headers.append((b"e2b-sandbox-id", handle.sandbox_id.encode()))
        envd_scope = dict(scope, headers=headers)
        envd_scope[SCOPE_KEY] = handle.envd
        processes = handle.envd.processes

        async def guarded_send(message: Any) -> None:
            if processes.closed:
                raise SandboxGone(handle.sandbox_id)
            await send(message)

        try:
            await self.envd_app(envd_scope, receive, guarded_send)
        except SandboxGone:
            # Re-raised on purpose: the server then drops the connection without ending the body.
            raise

    async def _forward(self, handle: Any, port: int, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await send_json(send, 501, {"code": 501, "message": "websockets to sandbox ports are not supported yet"})
            return

        async def body() -> Any:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                yield message.get("body", b"")
                if not message.get("more_body", False):
                    return

        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP_BY_HOP]
        query = scope.get("query_string", b"").decode("latin-1")
        url = f"http://{handle.ip}:{port}{scope.get('raw_path', scope['path'].encode()).decode('latin-1').split('?')[0]}"
        if query:
            url += "?" + query
        host = scope_headers(scope).get("host", f"localhost:{port}")
        headers.append((b"host", host.encode("latin-1")))
        request = self._client.build_request(scope["method"], url, headers=headers, content=body())
        try:
            response = await self._client.send(request, stream=True)
        except httpx.ConnectError:
            await send_json(
                send,
                502,
                {"sandboxId": handle.sandbox_id, "message": "The sandbox is running but port is not open", "port": port, "code": 502},
            )
            return
        try:
            out_headers = [
                (k.encode("latin-1"), v.encode("latin-1"))
                for k, v in response.headers.multi_items()
                if k.lower().encode() not in _HOP_BY_HOP and k.lower() != "content-length"
            ]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out_headers})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()

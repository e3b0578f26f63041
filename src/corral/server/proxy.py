"""Sandbox traffic on the shared port: find the sandbox and port a request is for, then serve it.

Routing (pure, `route_target`): Host `{port}-{sandboxID}.{domain}` first, else the headers
`E2b-Sandbox-Id` + `E2b-Sandbox-Port`. Port 49983 goes to the node's envd app; any other port is
reverse-proxied to that port inside the sandbox (`public_ports`: HTTP and WebSocket, the traffic
access token and `maskRequestHost` of the sandbox's ingress policy). Unknown or dead sandboxes answer 502 (the SDK's
`is_running()` reads 502 as "not running"). When a sandbox ends mid-request its envd streams are cut
at the transport level, as a dying VM would cut them, so clients see a dropped connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
from collections.abc import Mapping
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from corral.core.ids import is_sandbox_id
from corral.core.sandbox import ENVD_PORT
from corral.node.envd.context import SCOPE_KEY
from corral.node.envd.process import END_OF_STREAM_FOLLOWS, SandboxGone
from corral.server.public_ports import PublicPorts, check_traffic_token

__all__ = ["INTERNAL_ENVD_PATHS", "SandboxProxy", "route_target"]

log = logging.getLogger(__name__)

# envd paths only the orchestrator may call; never reachable from outside.
INTERNAL_ENVD_PATHS = frozenset({"/init", "/freeze", "/unfreeze", "/collapse", "/fsfreeze", "/fsthaw"})


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
        self.public_ports = PublicPorts()

    async def aclose(self) -> None:
        await self.public_ports.aclose()

    def _ingress(self, sandbox_id: str) -> Any:
        """The sandbox's ingress policy (traffic token, Host mask), as its node network keeps it."""
        policy_of = getattr(getattr(self.node, "network", None), "policy", None)
        policy = policy_of(sandbox_id) if policy_of is not None else None
        return policy.ingress if policy is not None else None

    async def _public_traffic_allowed(self, sandbox_id: str, port: int, scope: Scope, send: Send) -> bool:
        """Ports other than envd's need the traffic access token when the sandbox has one (403)."""
        refused = None if port == ENVD_PORT else check_traffic_token(self._ingress(sandbox_id), scope_headers(scope))
        if refused is not None:
            await self.public_ports.reject(scope, send, 403, {"sandboxId": sandbox_id, **refused})
        return refused is None

    async def __call__(self, scope: Scope, receive: Receive, send: Send, target: tuple[str, int]) -> None:
        sandbox_id, port = target
        if not await self._public_traffic_allowed(sandbox_id, port, scope, send):  # before any wake
            return
        # Auto-resume: traffic to a paused sandbox that asked for it wakes it (not a health probe).
        if sandbox_id not in self.node and not (port == ENVD_PORT and scope["path"] == "/health"):
            await self.node.wake(sandbox_id)
        if sandbox_id not in self.node:
            await self.public_ports.reject(scope, send, 502, {"sandboxId": sandbox_id, "message": "The sandbox was not found", "code": 502})
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
        started = False
        held: Any = None  # a stream's last message, sent with the end of stream that follows it

        async def guarded_send(message: Any) -> None:
            nonlocal started, held
            if processes.closed:
                raise SandboxGone(handle.sandbox_id)
            started = started or message["type"] == "http.response.start"
            if held is not None:
                await send(held)  # the server writes both in one turn: one send
                held = None
            if (
                message["type"] == "http.response.body"
                and message.get("more_body")
                and END_OF_STREAM_FOLLOWS.get()
            ):
                END_OF_STREAM_FOLLOWS.set(False)
                held = message
                return
            await send(message)

        try:
            await self.envd_app(envd_scope, receive, guarded_send)
            if held is not None:  # no end of stream came after all
                await send(held)
        except SandboxGone:
            if not started:
                await send_json(send, 502, {"sandboxId": handle.sandbox_id, "message": "The sandbox was not found", "code": 502})
                return
            # Cut the connection as a dying VM would: a reset, which the SDKs read as a dropped
            # connection (they then probe /health, get 502 and report the sandbox's end). ASGI has
            # no abort message, so use the server's transport when it is there (uvicorn's `send` is
            # a method of its request cycle, which holds it); either way, returning with the body
            # unfinished makes the server close the connection.
            log.info("sandbox %s ended: cutting its envd stream %s", handle.sandbox_id, scope["path"])
            transport = getattr(getattr(send, "__self__", None), "transport", None)
            sock = transport.get_extra_info("socket") if hasattr(transport, "get_extra_info") else None
            if sock is not None and hasattr(transport, "abort"):
                # A socket the client already closed has no fd left (uvloop raises ValueError).
                with contextlib.suppress(OSError, ValueError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                transport.abort()
                await asyncio.sleep(0)  # the server sees the connection lost before the call returns

    async def _forward(self, handle: Any, port: int, scope: Scope, receive: Receive, send: Send) -> None:
        ingress = self._ingress(handle.sandbox_id)
        await self.public_ports.forward(handle.sandbox_id, str(handle.ip), port, ingress, scope, receive, send)

"""A sandbox's public ports: `{port}-{sandboxID}.{domain}` (or E2b-Sandbox-* headers) for any port
but envd's, reverse-proxied to that port on the sandbox's address.

- HTTP/1.1 and HTTP/2 clients alike (the server speaks whatever uvicorn does); the request body is
  streamed to the sandbox as it arrives and the response streamed back as it comes (bounded
  buffers both ways: nothing is read ahead of what the other side accepted).
- WebSocket: uvicorn hands upgrades over as `websocket` scopes; they are relayed message by message
  to a WebSocket connection to the sandbox (subprotocol negotiated by the sandbox's server).
- Nothing listens on the port: 502 `The sandbox is running but port is not open`, as E2B answers.
- Ingress policy (`corral.node.network.policy.IngressPolicy`, E2B's `network` at create):
  `allowPublicTraffic=false` makes the header `e2b-traffic-access-token` required (403 when it is
  missing or wrong; the token is never passed on to the sandbox); `maskRequestHost` replaces the
  Host header the sandbox sees (`${PORT}` becomes the port).

The checks of `check_traffic_token` run before anything else touches the sandbox, so a request
without the token can neither reach its ports nor wake it from a pause.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
from collections.abc import Iterable
from typing import Any

import httpx
from starlette.types import Receive, Scope, Send

__all__ = [
    "PORT_CLOSED_MESSAGE",
    "TRAFFIC_TOKEN_HEADER",
    "PublicPorts",
    "check_traffic_token",
    "forwarded_headers",
]

log = logging.getLogger(__name__)

TRAFFIC_TOKEN_HEADER = "e2b-traffic-access-token"
PORT_CLOSED_MESSAGE = "The sandbox is running but port is not open"
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)
# What the WebSocket client library writes itself, from the handshake it makes.
_WEBSOCKET_OWN = frozenset(
    {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol"}
)


def check_traffic_token(ingress: Any, headers: dict[str, str]) -> dict[str, Any] | None:
    """The 403 body when the request lacks the sandbox's traffic access token, else None.
    `headers`: lower-cased names. A sandbox without a token (public traffic allowed) passes."""
    token = getattr(ingress, "traffic_access_token", None)
    if not token:
        return None
    given = headers.get(TRAFFIC_TOKEN_HEADER)
    if not given:
        return {"message": "missing traffic access token", "header": TRAFFIC_TOKEN_HEADER, "code": 403}
    if not hmac.compare_digest(given.encode("latin-1"), token.encode("latin-1")):
        return {"message": "invalid traffic access token", "header": TRAFFIC_TOKEN_HEADER, "code": 403}
    return None


def forwarded_headers(
    raw: Iterable[tuple[bytes, bytes]],
    *,
    host: str,
    client: str | None,
    scheme: str,
    drop: Iterable[str] = (),
) -> list[tuple[bytes, bytes]]:
    """The request headers to send to the sandbox: hop-by-hop ones (and those `Connection` names)
    removed, the traffic token removed, `Host` = `host`, X-Forwarded-For/-Proto/-Host added."""
    items = [(k.decode("latin-1").lower(), v) for k, v in raw]
    named = {
        token.strip().lower()
        for name, value in items
        if name == "connection"
        for token in value.decode("latin-1").split(",")
    }
    removed = _HOP_BY_HOP | named | {TRAFFIC_TOKEN_HEADER} | set(drop)
    original_host = next((v for k, v in items if k == "host"), None)
    out = [
        (k.encode("latin-1"), v) for k, v in items if k not in removed and not k.startswith("x-forwarded-")
    ]
    prior = ", ".join(v.decode("latin-1") for k, v in items if k == "x-forwarded-for")
    if client:
        out.append((b"x-forwarded-for", (f"{prior}, {client}" if prior else client).encode("latin-1")))
    out.append((b"x-forwarded-proto", scheme.encode("latin-1")))
    if original_host is not None:
        out.append((b"x-forwarded-host", original_host))
    out.append((b"host", host.encode("latin-1")))
    return out


def _path_and_query(scope: Scope) -> str:
    raw = scope.get("raw_path") or scope["path"].encode()
    path = raw.decode("latin-1").split("?", 1)[0] or "/"
    query = scope.get("query_string", b"").decode("latin-1")
    return f"{path}?{query}" if query else path


def _port_closed(sandbox_id: str, port: int) -> dict[str, Any]:
    return {"sandboxId": sandbox_id, "message": PORT_CLOSED_MESSAGE, "port": port, "code": 502}


async def _send_json(send: Send, status: int, body: Any, *, websocket: bool = False) -> None:
    data = json.dumps(body).encode()
    prefix = "websocket.http.response" if websocket else "http.response"
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": f"{prefix}.start", "status": status, "headers": headers})
    await send({"type": f"{prefix}.body", "body": data})


class PublicPorts:
    """Forwards requests for a sandbox's ports. Owns one HTTP client (connection pool) to sandboxes."""

    def __init__(self, connect_timeout: float = 5.0) -> None:
        self.connect_timeout = connect_timeout
        # trust_env=False: proxy settings of the server's environment must never carry sandbox traffic.
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=connect_timeout),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            follow_redirects=False,
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def reject(self, scope: Scope, send: Send, status: int, body: dict[str, Any]) -> None:
        """An error answer for an HTTP request or a WebSocket handshake (before it is accepted)."""
        if scope["type"] == "websocket":
            if "websocket.http.response" in scope.get("extensions", {}):
                await _send_json(send, status, body, websocket=True)
            else:
                await send({"type": "websocket.close", "code": 1008 if status == 403 else 1011})
            return
        await _send_json(send, status, body)

    async def forward(
        self, sandbox_id: str, ip: str, port: int, ingress: Any, scope: Scope, receive: Receive, send: Send
    ) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = (
            (ingress.host_for(port) if ingress is not None else None) or headers.get("host") or f"{ip}:{port}"
        )
        client = (scope.get("client") or (None,))[0]
        scheme = {"ws": "http", "wss": "https"}.get(scope.get("scheme", "http"), scope.get("scheme", "http"))
        if scope["type"] == "websocket":
            await self._websocket(sandbox_id, ip, port, host, client, scheme, scope, receive, send)
        else:
            await self._http(sandbox_id, ip, port, host, client, scheme, scope, receive, send)

    # -- HTTP --------------------------------------------------------------------------------

    async def _http(
        self, sandbox_id: str, ip: str, port: int, host: str, client: str | None, scheme: str,
        scope: Scope, receive: Receive, send: Send,
    ) -> None:  # fmt: skip
        async def body() -> Any:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                yield message.get("body", b"")
                if not message.get("more_body", False):
                    return

        out = forwarded_headers(scope["headers"], host=host, client=client, scheme=scheme)
        url = f"http://{ip}:{port}{_path_and_query(scope)}"
        request = self._client.build_request(scope["method"], url, headers=out, content=body())
        try:
            response = await self._client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            await _send_json(send, 502, _port_closed(sandbox_id, port))
            return
        except httpx.TransportError as exc:  # connected, but no HTTP answer came back
            log.info("sandbox %s port %s: no response: %r", sandbox_id, port, exc)
            await _send_json(
                send,
                502,
                {"sandboxId": sandbox_id, "message": f"bad gateway: {exc}", "port": port, "code": 502},
            )
            return
        try:
            named = {t.strip().lower() for t in response.headers.get("connection", "").split(",")}
            out_headers = [
                (k.encode("latin-1"), v.encode("latin-1"))
                for k, v in response.headers.multi_items()
                if k.lower() not in _HOP_BY_HOP and k.lower() not in named
            ]
            await send(
                {"type": "http.response.start", "status": response.status_code, "headers": out_headers}
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        except httpx.TransportError as exc:
            # The sandbox's server broke off mid-response: end ours unfinished, so the client sees
            # a truncated response rather than a complete-looking one.
            log.info("sandbox %s port %s: response cut: %r", sandbox_id, port, exc)
        finally:
            await response.aclose()

    # -- WebSocket ---------------------------------------------------------------------------

    async def _websocket(
        self, sandbox_id: str, ip: str, port: int, host: str, client: str | None, scheme: str,
        scope: Scope, receive: Receive, send: Send,
    ) -> None:  # fmt: skip
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

        first = await receive()
        if first["type"] != "websocket.connect":
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        protocols = [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
        extra = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in forwarded_headers(
                scope["headers"], host=host, client=client, scheme=scheme, drop=_WEBSOCKET_OWN
            )
            if k != b"host"
        ]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await asyncio.get_running_loop().sock_connect(sock, (ip, port))
        except (OSError, TimeoutError):
            sock.close()
            await self.reject(scope, send, 502, _port_closed(sandbox_id, port))
            return
        try:
            upstream = await connect(
                f"ws://{host}{_path_and_query(scope)}",  # the URI names the Host; `sock` is where it goes
                sock=sock,
                proxy=None,
                subprotocols=protocols or None,  # type: ignore[arg-type]
                additional_headers=extra,
                user_agent_header=None,
                compression=None,
                max_size=None,
                ping_interval=None,  # the two ends ping each other through us if they want to
                open_timeout=self.connect_timeout,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            await self.reject(
                scope,
                send,
                status if 400 <= status < 600 else 502,
                {"message": f"sandbox refused the WebSocket: {status}", "code": status},
            )
            return
        except (InvalidHandshake, OSError, TimeoutError, ValueError) as exc:
            sock.close()
            await self.reject(
                scope,
                send,
                502,
                {"sandboxId": sandbox_id, "message": f"bad gateway: {exc}", "port": port, "code": 502},
            )
            return

        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})

        async def client_to_sandbox() -> None:
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    await upstream.close(code=message.get("code", 1000))
                    return
                if message.get("bytes") is not None:
                    await upstream.send(message["bytes"])
                elif message.get("text") is not None:
                    await upstream.send(message["text"])

        async def sandbox_to_client() -> None:
            try:
                async for data in upstream:
                    key = "bytes" if isinstance(data, bytes) else "text"
                    await send({"type": "websocket.send", key: data})
            except ConnectionClosed:
                pass
            close = upstream.close_code or 1000
            reason = upstream.close_reason or ""
            await send(
                {
                    "type": "websocket.close",
                    "code": 1000 if close in (1005, 1006) else close,
                    "reason": reason,
                }
            )

        tasks = [asyncio.create_task(client_to_sandbox()), asyncio.create_task(sandbox_to_client())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                try:
                    await task
                except (asyncio.CancelledError, ConnectionClosed, OSError, RuntimeError):
                    pass
                except Exception:
                    log.debug("websocket relay to sandbox %s port %s ended", sandbox_id, port, exc_info=True)
            await upstream.close()

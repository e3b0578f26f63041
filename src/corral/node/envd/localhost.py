"""envd inside each sandbox at `http://localhost:49983`, as a sandboxed envd would be.

The code interpreter calls `http://localhost:49983/envs` from inside the sandbox, and user tooling
calls `/files` there. envd is served by the node (design.md), so for every sandbox the node opens
a listening TCP socket on 127.0.0.1:49983 *inside the sandbox's network namespace*: a helper
thread joins the namespace with setns(2), creates, binds and listens, and then ends (a socket
stays in the namespace it was created in; the thread's namespace dies with it, so no pool thread
is ever left in a sandbox's namespace). The socket is served on the server's event loop by an
asyncio server with uvicorn's HTTP protocol — no extra thread or process per sandbox.

Every request on that socket is for *this* sandbox only: the `E2b-Sandbox-*` and `Host` headers a
sandbox process sends are replaced, and the request goes to the same envd path as a request over
the shared port (`serve(scope, receive, send, (sandbox_id, 49983))`, i.e. the proxy), so the
access token is still required and a sandbox cannot reach another sandbox through it.

`close(sandbox_id)` (the sandbox is destroyed) stops listening and aborts open connections, which
also releases the socket's hold on the network namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
from collections.abc import Awaitable, Callable

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.server import ServerState

from corral.core.sandbox import ENVD_PORT
from corral.node.network.in_netns import run_in_netns

__all__ = ["LOCAL_ENVD_HOST", "LocalEnvd", "bind_in_netns", "local_headers"]

log = logging.getLogger(__name__)

LOCAL_ENVD_HOST = "127.0.0.1"
_BACKLOG = 64
_MAX_CONNECTIONS = 64  # per sandbox; uvicorn answers 503 beyond
_STRIPPED = {b"host", b"e2b-sandbox-id", b"e2b-sandbox-port"}

Serve = Callable[[Scope, Receive, Send, tuple[str, int]], Awaitable[None]]

def bind_in_netns(netns_path: str, host: str, port: int, backlog: int = _BACKLOG) -> socket.socket:
    """A listening, non-blocking TCP socket bound to host:port inside the network namespace at
    `netns_path` (e.g. `/proc/<pid>/ns/net`). Runs in a short-lived thread of its own."""

    def bind() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    return run_in_netns(netns_path, bind, name="corral-netns-bind")


def local_headers(headers: list[tuple[bytes, bytes]], sandbox_id: str) -> list[tuple[bytes, bytes]]:
    """The request's headers with the sandbox forced: routing headers from inside are dropped."""
    kept = [(k, v) for k, v in headers if k.lower() not in _STRIPPED]
    return [
        (b"host", f"localhost:{ENVD_PORT}".encode()),
        *kept,
        (b"e2b-sandbox-id", sandbox_id.encode()),
        (b"e2b-sandbox-port", str(ENVD_PORT).encode()),
    ]


@dataclasses.dataclass(eq=False)
class _Listener:
    sock: socket.socket
    state: ServerState
    server: asyncio.base_events.Server | None = None
    starting: asyncio.Task[None] | None = None


class LocalEnvd:
    """The localhost envd listeners of all sandboxes on this node (one per sandbox)."""

    def __init__(self, serve: Serve, port: int = ENVD_PORT) -> None:
        self._serve = serve
        self._port = port
        self._listeners: dict[str, _Listener] = {}

    def __contains__(self, sandbox_id: str) -> bool:
        return sandbox_id in self._listeners

    def open(self, sandbox_id: str, netns_path: str) -> bool:
        """Listen on localhost:49983 in the sandbox's namespace (from the event loop's thread).

        False (logged) when that is impossible, e.g. a process in a re-adopted sandbox took the
        port; the sandbox works without it."""
        self.close(sandbox_id)
        try:
            sock = bind_in_netns(netns_path, LOCAL_ENVD_HOST, self._port)
        except OSError as exc:
            log.warning("sandbox %s: cannot serve envd on localhost:%d: %s", sandbox_id, self._port, exc)
            return False
        try:
            config = uvicorn.Config(
                self._app_for(sandbox_id),
                lifespan="off",
                proxy_headers=False,
                server_header=False,
                log_config=None,
                access_log=False,
                ws="none",
                limit_concurrency=_MAX_CONNECTIONS,
            )
            config.load()
            loop = asyncio.get_running_loop()
        except BaseException:
            sock.close()
            raise
        listener = _Listener(sock=sock, state=ServerState())

        def protocol() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=listener.state, app_state={}, _loop=loop
            )

        async def start() -> None:
            listener.server = await loop.create_server(protocol, sock=sock, backlog=_BACKLOG)

        listener.starting = loop.create_task(start(), name=f"local-envd-{sandbox_id}")
        self._listeners[sandbox_id] = listener
        return True

    def _app_for(self, sandbox_id: str) -> ASGIApp:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                return
            local = dict(scope, headers=local_headers(scope["headers"], sandbox_id))
            await self._serve(local, receive, send, (sandbox_id, ENVD_PORT))

        return app

    def close(self, sandbox_id: str) -> None:
        """Stop serving a sandbox: no new connections, open ones aborted."""
        listener = self._listeners.pop(sandbox_id, None)
        if listener is None:
            return
        if listener.starting is not None and not listener.starting.done():
            listener.starting.cancel()
        if listener.server is not None:
            listener.server.close()
        for connection in list(listener.state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abort()
        with contextlib.suppress(OSError):
            listener.sock.close()

    def close_all(self) -> None:
        for sandbox_id in list(self._listeners):
            self.close(sandbox_id)

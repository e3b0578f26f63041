"""The SDK's HTTP transport: httpx's own, reading the network in larger pieces and sending a
request's head together with its body.

Why: httpcore reads a response 64 KiB at a time, and each piece costs a round through its HTTP/1.1
parser in Python; a 100 MB download was limited by that to ~250 MB/s, well below what the server
sends. Reads here ask for up to READ_SIZE bytes (a read still returns whatever has arrived, so
small answers are not delayed). And httpcore writes a request's head and its body separately: two
TCP segments, so the server woke up for the head and again for the body (~1 ms per command here).
The first write after a read (a request's head) is held, up to HOLD_MAX bytes, until the next
write or read, so head and body leave in one send. Everything else is httpx's default transport.

The larger reads are installed as an httpcore network backend (public API) on the connection pool
of an `httpx.AsyncHTTPTransport`. httpx does not take a backend as an argument, so the pool is
replaced right after construction, with httpx's default limits; if a future httpx keeps its pool
elsewhere, the transport stays httpx's default one.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

__all__ = ["HOLD_MAX", "READ_SIZE", "open_transport"]

READ_SIZE = 1 << 20
HOLD_MAX = 64 * 1024
_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0)  # httpx's


class _LargeReadStream(httpcore.AsyncNetworkStream):
    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner
        self._held = b""  # a request head not sent yet
        self._may_hold = True  # no write since the last read: the next write starts a request

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._held:
            await self._send_held(timeout)
        self._may_hold = True
        return await self._inner.read(max(max_bytes, READ_SIZE), timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        if self._may_hold and len(buffer) <= HOLD_MAX:
            self._may_hold = False
            self._held = bytes(buffer)
            return
        self._may_hold = False
        if self._held:
            buffer, self._held = self._held + buffer, b""
        await self._inner.write(buffer, timeout)

    async def _send_held(self, timeout: float | None) -> None:
        held, self._held = self._held, b""
        await self._inner.write(held, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        return _LargeReadStream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _LargeReadBackend(httpcore.AsyncNetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _LargeReadStream(stream)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        return _LargeReadStream(await self._inner.connect_unix_socket(path, timeout, socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def open_transport(ssl_context: ssl.SSLContext) -> httpx.AsyncHTTPTransport:
    """httpx's default transport (TLS with `ssl_context`) with the larger network reads."""
    transport = httpx.AsyncHTTPTransport(verify=ssl_context, limits=_LIMITS)
    if isinstance(getattr(transport, "_pool", None), httpcore.AsyncConnectionPool):
        transport._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=_LIMITS.max_connections,
            max_keepalive_connections=_LIMITS.max_keepalive_connections,
            keepalive_expiry=_LIMITS.keepalive_expiry,
            network_backend=_LargeReadBackend(),
        )
    return transport

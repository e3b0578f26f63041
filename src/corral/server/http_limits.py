"""uvicorn's HTTP/1.1 protocol with limits on the request head, against slow and bloated clients.

uvicorn closes idle keep-alive connections, but a connection that is still sending its request
line and headers has no deadline and no size limit (httptools streams the URL and headers into
Python without a cap). A slowloris client can then hold connections until the server runs out of
file descriptors, and a client that never ends its URL grows the server's memory. Like nginx's
`client_header_timeout` and `large_client_header_buffers`, a request head must be complete within
`HEAD_TIMEOUT_S` of its first byte (or of the connection) and within `MAX_HEAD_BYTES`; otherwise
the connection is closed (with 431 for an oversized head). Bodies and responses are not limited
here (the API limits JSON bodies itself; envd streams are long-lived on purpose).

The same protocol sends what a response writes in one event-loop turn as one `send`
(`CoalescingTransport`): uvicorn writes a response's head and each body message separately, so
a Connect stream's head and first message (and a unary answer's head and body) went out as two
TCP segments, each waking the client. Here they leave together at the end of the turn; large
writes are not held, and a completed response is flushed at once.

`http_protocol()` returns the class to pass as `uvicorn.run(..., http=...)`.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["COALESCE_MAX_BYTES", "HEAD_TIMEOUT_S", "MAX_HEAD_BYTES", "CoalescingTransport", "http_protocol"]

HEAD_TIMEOUT_S = 15.0
MAX_HEAD_BYTES = 64 * 1024
COALESCE_MAX_BYTES = 64 * 1024  # writes this large go out at once (file downloads: 1 MiB pieces)


class CoalescingTransport:
    """A transport whose small writes made in one event-loop turn go out as one write.

    Held bytes are written at the end of the turn (`call_soon`), before anything larger, on
    `flush()`, and before `close`/`write_eof`; `abort` drops them, as it drops the transport's own
    buffer. Everything else is the wrapped transport's. Once the connection is handed to another
    protocol (a WebSocket upgrade), writes pass straight through.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, owner: object) -> None:
        self._transport = transport
        self._loop = loop
        self._owner = owner
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._flush_scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if len(data) >= COALESCE_MAX_BYTES or self._transport.get_protocol() is not self._owner:
            self.flush()
            self._transport.write(data)
            return
        self._held.append(bytes(data))
        self._held_bytes += len(data)
        if self._held_bytes >= COALESCE_MAX_BYTES:
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._scheduled_flush)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def flush(self) -> None:
        if not self._held:
            return
        data = self._held[0] if len(self._held) == 1 else b"".join(self._held)
        self._held.clear()
        self._held_bytes = 0
        if not self._transport.is_closing():
            self._transport.write(data)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._held.clear()
        self._held_bytes = 0
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _HeadLimits:
    """Mixin over a uvicorn HTTP protocol class (which sets `transport`, `cycle` and `loop`): the
    head limits, and the protocol writes through a `CoalescingTransport`."""

    transport: asyncio.Transport
    cycle: Any
    loop: asyncio.AbstractEventLoop
    head_timeout_s = HEAD_TIMEOUT_S
    max_head_bytes = MAX_HEAD_BYTES

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._writer = CoalescingTransport(transport, self.loop, self)
        super().connection_made(self._writer)  # type: ignore[misc]
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._arm_head_timer()

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def data_received(self, data: bytes) -> None:
        waiting = self._between_requests()
        super().data_received(data)  # type: ignore[misc]
        if not self._between_requests():  # a request head was completed: its app runs now
            # (what else `data` held is body, which is not limited here: a head and the start of
            # a large upload often arrive in one read)
            self._cancel_head_timer()
            self._head_bytes = 0
            return
        if waiting:  # still in a head: at most one read's worth past the limit is ever buffered
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self._refuse(b"431 Request Header Fields Too Large")
                return
        self._arm_head_timer()  # (re)starts the deadline only when none is running

    def on_response_complete(self) -> None:
        self._writer.flush()  # the response's last bytes: nothing will join them in this turn
        super().on_response_complete()  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm_head_timer(self) -> None:
        if self._head_timer is None and not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.get_protocol() is not self:  # upgraded to a WebSocket: not ours any more
            return
        if self._between_requests() and not self.transport.is_closing():
            if self._head_bytes:
                self._refuse(b"408 Request Timeout")
            else:
                self.transport.close()  # an idle keep-alive or silent connection: just close

    def _refuse(self, status: bytes) -> None:
        self._cancel_head_timer()
        if not self.transport.is_closing():
            self.transport.write(
                b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
            self.transport.close()


def http_protocol() -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol (h11 when httptools is missing) with the head limits."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:  # pragma: no cover - httptools is part of uvicorn[standard]
        from uvicorn.protocols.http.h11_impl import H11Protocol as base  # type: ignore[assignment]

    return type("HeadLimited" + base.__name__, (_HeadLimits, base), {})

"""The SDK transport sends a request's head with its body (one segment, one server wake-up), and
never holds anything past the moment it waits for an answer."""

from __future__ import annotations

import httpx

from corral.sdk._async._transport import HOLD_MAX
from corral.sdk._async._transport import _LargeReadStream as AsyncStream
from corral.sdk._sync._transport import _LargeReadStream as SyncStream


class FakeStream:
    def __init__(self) -> None:
        self.log: list[tuple[str, bytes]] = []

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.log.append(("write", bytes(buffer)))

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self.log.append(("read", b""))
        return b"answer"


class AsyncFakeStream(FakeStream):
    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # type: ignore[override]
        FakeStream.write(self, buffer, timeout)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # type: ignore[override]
        return FakeStream.read(self, max_bytes, timeout)


def test_head_and_body_leave_in_one_write() -> None:
    inner = FakeStream()
    stream = SyncStream(inner)  # type: ignore[arg-type]
    stream.write(b"POST / HTTP/1.1\r\ncontent-length: 4\r\n\r\n")
    stream.write(b"body")
    stream.write(b"")  # h11's end of message for a sized body
    assert stream.read(100) == b"answer"
    assert inner.log == [("write", b"POST / HTTP/1.1\r\ncontent-length: 4\r\n\r\nbody"), ("read", b"")]


def test_a_head_alone_goes_before_the_read_and_the_next_request_is_held_again() -> None:
    inner = FakeStream()
    stream = SyncStream(inner)  # type: ignore[arg-type]
    stream.write(b"GET /health HTTP/1.1\r\n\r\n")
    assert inner.log == []
    stream.read(100)
    stream.write(b"POST /x HTTP/1.1\r\n\r\n")
    stream.write(b"{}")
    stream.read(100)
    assert [entry[1] for entry in inner.log] == [
        b"GET /health HTTP/1.1\r\n\r\n",
        b"",
        b"POST /x HTTP/1.1\r\n\r\n{}",
        b"",
    ]


def test_only_the_first_write_is_held_and_large_ones_are_not() -> None:
    inner = FakeStream()
    stream = SyncStream(inner)  # type: ignore[arg-type]
    stream.write(b"head")
    stream.write(b"chunk-1")
    stream.write(b"chunk-2")  # a streamed body: each later piece goes at once
    assert [entry[1] for entry in inner.log] == [b"headchunk-1", b"chunk-2"]
    stream.read(100)
    big = b"x" * (HOLD_MAX + 1)
    stream.write(big)
    assert inner.log[-1] == ("write", big)


async def test_async_twin_behaves_the_same() -> None:
    inner = AsyncFakeStream()
    stream = AsyncStream(inner)  # type: ignore[arg-type]
    await stream.write(b"head")
    await stream.write(b"body")
    assert await stream.read(100) == b"answer"
    assert inner.log == [("write", b"headbody"), ("read", b"")]


def test_a_real_client_round_trip_through_the_transport() -> None:
    """httpx over the transport against a socket server that answers only once it has the body."""
    import socket
    import threading

    from corral.sdk._http import shared_ssl_context
    from corral.sdk._sync._transport import open_transport

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    received: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            for _ in range(2):
                data = b""
                while not data.endswith(b"hello"):
                    data += conn.recv(65536)
                received.append(data)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with httpx.Client(transport=open_transport(shared_ssl_context())) as client:
        for _ in range(2):  # the second request reuses the connection
            response = client.post(f"http://127.0.0.1:{port}/x", content=b"hello")
            assert response.status_code == 200 and response.text == "ok"
    thread.join(5)
    listener.close()
    assert len(received) == 2 and all(r.startswith(b"POST /x HTTP/1.1\r\n") for r in received)

"""The server's write coalescing (`corral.server.http_limits.CoalescingTransport`): small writes of
one event-loop turn leave as one write, large ones at once, and nothing is lost or reordered."""

from __future__ import annotations

import asyncio

import pytest

from corral.server.http_limits import COALESCE_MAX_BYTES, CoalescingTransport


class FakeTransport:
    def __init__(self, protocol: object) -> None:
        self.protocol = protocol
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(bytes(data))

    def write_eof(self) -> None:
        self.writes.append(b"<eof>")

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def get_protocol(self) -> object:
        return self.protocol

    def get_extra_info(self, name: str) -> object:
        return f"info:{name}"


async def _next_turn() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def _pair() -> tuple[FakeTransport, CoalescingTransport]:
    owner = object()
    raw = FakeTransport(owner)
    return raw, CoalescingTransport(raw, asyncio.get_running_loop(), owner)  # type: ignore[arg-type]


async def test_writes_of_one_turn_leave_together() -> None:
    raw, writer = _pair()
    writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
    writer.write(b"5\r\nstart\r\n")
    assert raw.writes == []
    await _next_turn()
    assert raw.writes == [b"HTTP/1.1 200 OK\r\n\r\n5\r\nstart\r\n"]
    writer.write(b"3\r\nend\r\n")
    await _next_turn()
    assert raw.writes[1:] == [b"3\r\nend\r\n"]


async def test_large_writes_go_at_once_after_what_is_held() -> None:
    raw, writer = _pair()
    big = b"x" * COALESCE_MAX_BYTES
    writer.write(b"head")
    writer.write(big)
    assert raw.writes == [b"head", big]  # in order, the large one not copied into the small one
    writer.write(b"a" * (COALESCE_MAX_BYTES // 2))
    writer.write(b"b" * (COALESCE_MAX_BYTES // 2))  # the held bytes reach the limit: out now
    assert len(raw.writes) == 3 and len(raw.writes[2]) == COALESCE_MAX_BYTES


async def test_flush_close_and_eof_send_what_is_held_abort_drops_it() -> None:
    raw, writer = _pair()
    writer.write(b"one")
    writer.flush()
    assert raw.writes == [b"one"]
    writer.write(b"two")
    writer.write_eof()
    assert raw.writes == [b"one", b"two", b"<eof>"]
    writer.write(b"three")
    writer.close()
    assert raw.writes[-1] == b"three" and raw.closed
    await _next_turn()  # the turn's flush finds nothing left and writes nothing to a closed transport

    raw, writer = _pair()
    writer.write(b"lost")
    writer.abort()
    await _next_turn()
    assert raw.writes == [] and raw.aborted


async def test_other_protocols_write_straight_through_and_attributes_pass() -> None:
    raw, writer = _pair()
    writer.write(b"101 head")
    raw.protocol = object()  # upgraded to a WebSocket protocol
    writer.write(b"frame")
    assert raw.writes == [b"101 head", b"frame"]
    assert writer.get_extra_info("socket") == "info:socket"


@pytest.mark.parametrize("chunks", [[b""], [b"", b"x"]])
async def test_empty_writes_are_ignored(chunks: list[bytes]) -> None:
    raw, writer = _pair()
    for chunk in chunks:
        writer.write(chunk)
    await _next_turn()
    assert raw.writes == [c for c in [b"".join(chunks)] if c]

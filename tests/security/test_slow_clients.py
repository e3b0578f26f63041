"""Slow and bloated HTTP clients do not starve others (gVisor class HostDoS, attacker = Remote).

All traffic stays on loopback, against the test server. A slowloris crowd dribbles header bytes
on many connections while a normal client uses the API; the normal client's requests stay fast.
Connections whose request head never completes are closed after `HEAD_TIMEOUT_S`, and a head larger
than `MAX_HEAD_BYTES` is refused, so neither file descriptors nor memory can be held forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import time
from pathlib import Path

import httpx
import pytest

from corral.server.http_limits import HEAD_TIMEOUT_S, MAX_HEAD_BYTES
from tests.conftest import TEST_API_KEY, ServerProcess

pytestmark = [pytest.mark.integration]

SLOW_CLIENTS = 1000


async def _slow_client(port: int, stop: asyncio.Event, opened: list[int]) -> None:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return
    opened.append(1)
    try:
        writer.write(b"GET /v2/sandboxes HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        await writer.drain()
        while not stop.is_set():
            writer.write(b"a")
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def test_slowloris_crowd_does_not_starve_a_normal_client(corral_server: ServerProcess) -> None:
    """HostDoS: 1000 connections each sending one header byte a second; meanwhile every normal API
    request is answered, each within 2 s and with a median under 0.5 s."""
    stop = asyncio.Event()
    opened: list[int] = []
    crowd = [asyncio.create_task(_slow_client(corral_server.port, stop, opened)) for _ in range(SLOW_CLIENTS)]
    try:
        opening = time.monotonic() + 5  # the crowd is in (and the measuring below ends before HEAD_TIMEOUT_S)
        while len(opened) < SLOW_CLIENTS * 0.9 and time.monotonic() < opening:
            await asyncio.sleep(0.05)
        assert len(opened) >= SLOW_CLIENTS * 0.9, f"only {len(opened)} slow connections opened"
        took: list[float] = []
        async with httpx.AsyncClient(
            base_url=corral_server.url, headers={"X-API-Key": TEST_API_KEY}, timeout=10
        ) as client:
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline:
                start = time.perf_counter()
                answer = await client.get("/v2/sandboxes", headers={"Connection": "close"})
                took.append(time.perf_counter() - start)
                assert answer.status_code == 200
                await asyncio.sleep(0.2)
        print(
            f"normal client under slowloris: median {statistics.median(took) * 1000:.0f} ms, max {max(took) * 1000:.0f} ms"
        )
        assert max(took) < 2.0 and statistics.median(took) < 0.5
    finally:
        stop.set()
        await asyncio.gather(*crowd, return_exceptions=True)


def test_incomplete_and_silent_connections_are_closed(corral_server: ServerProcess) -> None:
    """HostDoS: a connection that never finishes its request head, and one that never sends a byte,
    are closed by the server soon after `HEAD_TIMEOUT_S`."""
    partial = socket.create_connection(("127.0.0.1", corral_server.port), timeout=HEAD_TIMEOUT_S + 10)
    silent = socket.create_connection(("127.0.0.1", corral_server.port), timeout=HEAD_TIMEOUT_S + 10)
    try:
        partial.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a")
        start = time.monotonic()
        reply = partial.recv(4096)
        waited = time.monotonic() - start
        assert reply == b"" or reply.startswith(b"HTTP/1.1 408"), reply
        assert HEAD_TIMEOUT_S - 1 <= waited <= HEAD_TIMEOUT_S + 5, waited
        assert silent.recv(4096) == b""  # closed by now too (it started at the same time)
    finally:
        partial.close()
        silent.close()


def test_oversized_request_head_is_refused(corral_server: ServerProcess) -> None:
    """HostDoS: a request line or headers larger than `MAX_HEAD_BYTES` get 431 and a closed
    connection; the server's memory does not grow with it and it keeps serving."""
    assert corral_server.proc is not None
    status = Path(f"/proc/{corral_server.proc.pid}/status")

    def rss() -> int:
        return next(
            int(line.split()[1]) * 1024
            for line in status.read_text().splitlines()
            if line.startswith("VmRSS:")
        )

    before = rss()
    for head in (
        b"GET /" + b"a" * (8 * MAX_HEAD_BYTES) + b" HTTP/1.1\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"b" * (8 * MAX_HEAD_BYTES) + b"\r\n",
    ):
        with socket.create_connection(("127.0.0.1", corral_server.port), timeout=10) as sock:
            with contextlib.suppress(ConnectionError):
                for i in range(0, len(head), 65536):
                    sock.sendall(head[i : i + 65536])
            reply = b""
            with contextlib.suppress(ConnectionError):
                reply = sock.recv(4096)
            assert reply == b"" or reply.startswith(b"HTTP/1.1 431"), reply[:80]
    assert httpx.get(f"{corral_server.url}/health", timeout=5).status_code == 200
    assert rss() < before + (50 << 20)

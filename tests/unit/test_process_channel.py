"""envd process service, pure parts: the output channel, end events, cwd and user selection."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from connectrpc.errors import ConnectError

from corral.node.envd.process import (
    _IDLE,
    OutputChannel,
    SandboxGone,
    _end_event,
    acting_username,
    resolve_cwd,
)
from corral.node.runtime.base import ExitStatus


async def test_channel_send_waits_while_full_and_resumes_in_order() -> None:
    channel = OutputChannel(limit=2)
    await channel.send(1)
    await channel.send(2)
    third = asyncio.ensure_future(channel.send(3))
    await asyncio.sleep(0.01)
    assert not third.done()  # back-pressure: the producer waits
    assert await channel.receive(1) == 1
    await asyncio.wait_for(third, 1)
    assert [await channel.receive(1), await channel.receive(1)] == [2, 3]


async def test_channel_close_releases_a_waiting_sender_and_drops_items() -> None:
    channel = OutputChannel(limit=1)
    await channel.send("a")
    blocked = asyncio.ensure_future(channel.send("b"))
    await asyncio.sleep(0.01)
    channel.close()
    await asyncio.wait_for(blocked, 1)  # a receiver that went away never blocks the pump
    await channel.send("c")  # and later sends return at once
    channel.send_final("end")
    assert await channel.receive(0) is _IDLE  # nothing is queued after close


async def test_channel_receive_timeout_keeps_items() -> None:
    channel = OutputChannel()
    assert await channel.receive(0.01) is _IDLE
    waiter = asyncio.ensure_future(channel.receive(10))
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    channel.send_final("x")  # sent after a cancelled receive: still there for the next one
    assert await channel.receive(1) == "x"


async def test_channel_end_goes_past_the_limit() -> None:
    channel = OutputChannel(limit=1)
    await channel.send("data")
    channel.send_final("end")
    assert [await channel.receive(1), await channel.receive(1)] == ["data", "end"]


async def test_channel_abort_cuts_even_with_items_queued() -> None:
    channel = OutputChannel()
    await channel.send("data")
    channel.abort()
    with pytest.raises(SandboxGone):
        await channel.receive(1)
    idle = OutputChannel()
    waiter = asyncio.ensure_future(idle.receive(None))
    await asyncio.sleep(0)
    idle.abort()  # wakes a receiver that is waiting
    with pytest.raises(SandboxGone):
        await asyncio.wait_for(waiter, 1)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (ExitStatus(0), {"exited": True, "status": "exit status 0"}),  # proto3 JSON omits the 0
        (ExitStatus(3), {"exitCode": 3, "exited": True, "status": "exit status 3", "error": "exit status 3"}),
        (
            ExitStatus(-1, signal=9),
            {"exitCode": -1, "status": "signal: killed", "error": "signal: killed"},
        ),
        (
            ExitStatus(-1, signal=15),
            {"exitCode": -1, "status": "signal: terminated", "error": "signal: terminated"},
        ),
        (
            ExitStatus(-1, signal=40),
            {"exitCode": -1, "status": "signal: signal 40", "error": "signal: signal 40"},
        ),
    ],
)
def test_end_event_matches_envd(status: ExitStatus, expected: dict[str, object]) -> None:
    assert json.loads(_end_event(status).to_json()) == {"end": expected}


@pytest.mark.parametrize(
    ("cwd", "expected"),
    [
        (None, "/home/user"),
        ("", "/home/user"),
        ("~", "/home/user"),
        ("~/src", "/home/user/src"),
        ("src/x", "/home/user/src/x"),
        ("/tmp", "/tmp"),
        ("~other", "/home/user/~other"),
    ],
)
def test_resolve_cwd(cwd: str | None, expected: str) -> None:
    assert resolve_cwd(cwd, "/home/user") == expected


def _basic(user: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:".encode()).decode()}


def test_acting_username() -> None:
    assert acting_username({}) == "user"
    assert acting_username(_basic("root")) == "root"
    assert acting_username(_basic("")) == "user"
    assert acting_username({"authorization": "Bearer x"}) == "user"
    with pytest.raises(ConnectError):
        acting_username({"authorization": "Basic " + base64.b64encode(b"\xff:").decode()})

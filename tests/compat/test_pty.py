"""PTYs with the official e2b SDK (async and sync flavours) against a real server."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from e2b import AsyncSandbox, CommandExitException, PtySize, Sandbox

from tests import gvisor

pytestmark = pytest.mark.compat


class Screen:
    """Everything a terminal printed, and a way to wait for some of it."""

    def __init__(self) -> None:
        self.data = b""
        self._lock = threading.Lock()

    def feed(self, data: bytes) -> None:
        with self._lock:
            self.data += data

    def wait_sync(self, needle: bytes, after: int = 0, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.data[after:]:
            assert time.monotonic() < deadline, f"{needle!r} not in {self.data[after:]!r}"
            time.sleep(0.02)

    async def wait(self, needle: bytes, after: int = 0, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.data[after:]:
            assert time.monotonic() < deadline, f"{needle!r} not in {self.data[after:]!r}"
            await asyncio.sleep(0.02)


@pytest.fixture
async def asandbox(e2b_env: Any) -> AsyncIterator[AsyncSandbox]:
    sbx = await AsyncSandbox.create(timeout=120)
    try:
        yield sbx
    finally:
        await sbx.kill()


@gvisor.HOST_PTY
async def test_pty_size_term_resize_and_exit(asandbox: AsyncSandbox) -> None:
    screen = Screen()
    terminal = await asandbox.pty.create(PtySize(rows=24, cols=80), on_data=screen.feed)
    await asandbox.pty.send_stdin(terminal.pid, b"echo T=$TERM; tput cols; tty\n")
    await screen.wait(b"T=xterm-256color\r\n80\r\n/dev/pts/")
    mark = len(screen.data)
    await asandbox.pty.resize(terminal.pid, PtySize(rows=30, cols=123))
    await asandbox.pty.send_stdin(terminal.pid, b"tput cols; tput lines\n")
    await screen.wait(b"123\r\n30\r\n", after=mark)
    assert terminal.pid in {p.pid for p in await asandbox.commands.list()}
    await asandbox.pty.send_stdin(terminal.pid, b"exit\n")
    result = await terminal.wait()
    assert (result.exit_code, result.error) == (0, None)


async def test_pty_reconnect_then_kill(asandbox: AsyncSandbox) -> None:
    first = Screen()
    terminal = await asandbox.pty.create(PtySize(rows=24, cols=80), on_data=first.feed)
    # Needles are command *output* ("before-1"), never the echo of what was typed ("before-$((0+1))").
    await asandbox.pty.send_stdin(terminal.pid, b"echo before-$((0+1))\n")
    await first.wait(b"before-1\r\n")
    await terminal.disconnect()
    again = Screen()
    reconnected = await asandbox.pty.connect(terminal.pid, on_data=again.feed)
    await asandbox.pty.send_stdin(terminal.pid, b"echo after-$((40+2))\n")
    await again.wait(b"after-42\r\n")
    assert b"before-1" not in again.data  # output from the moment of connecting
    assert await asandbox.pty.kill(terminal.pid) is True
    with pytest.raises(CommandExitException) as info:
        await reconnected.wait()
    assert (info.value.exit_code, info.value.error) == (-1, "signal: killed")
    assert await asandbox.pty.kill(terminal.pid) is False


async def test_pty_user_cwd_envs(asandbox: AsyncSandbox) -> None:
    screen = Screen()
    terminal = await asandbox.pty.create(
        PtySize(rows=24, cols=80), on_data=screen.feed, user="root", cwd="/tmp", envs={"GREETING": "hi"}
    )
    await asandbox.pty.send_stdin(terminal.pid, b"echo $(whoami):$(pwd):$GREETING; exit 3\n")
    with pytest.raises(CommandExitException) as info:
        await terminal.wait()
    assert info.value.exit_code == 3
    assert b"root:/tmp:hi\r\n" in screen.data


@gvisor.HOST_PTY
async def test_pty_keeps_running_a_foreground_job_after_kill_of_the_shell(asandbox: AsyncSandbox) -> None:
    screen = Screen()
    terminal = await asandbox.pty.create(PtySize(rows=24, cols=80), on_data=screen.feed)
    await asandbox.pty.send_stdin(terminal.pid, b"sleep 300 | cat\n")
    deadline = time.monotonic() + 10  # the job runs (the kill below must find it running)
    while not (await asandbox.commands.run("pgrep -x sleep || true")).stdout:
        assert time.monotonic() < deadline, "the foreground job never started"
        await asyncio.sleep(0.05)
    await asandbox.pty.kill(terminal.pid)
    with pytest.raises(CommandExitException):
        await asyncio.wait_for(terminal.wait(), 10)  # the stream ends although the job held the tty
    deadline = time.monotonic() + 10
    while (await asandbox.commands.run("pgrep -x sleep || true")).stdout and time.monotonic() < deadline:
        await asyncio.sleep(0.1)  # closing the terminal hangs up its jobs
    assert (await asandbox.commands.run("pgrep -x sleep || true")).stdout == ""


def test_pty_sync(sandbox: Sandbox) -> None:
    screen = Screen()
    terminal = sandbox.pty.create(PtySize(rows=24, cols=80))
    results: list[Any] = []
    reader = threading.Thread(target=_wait_into(lambda: terminal.wait(on_pty=screen.feed), results))
    reader.start()
    sandbox.pty.send_stdin(terminal.pid, b"tput cols\n")
    screen.wait_sync(b"80\r\n")
    sandbox.pty.resize(terminal.pid, PtySize(rows=24, cols=99))
    sandbox.pty.send_stdin(terminal.pid, b"tput cols; exit\n")
    screen.wait_sync(b"99\r\n")
    reader.join(10)
    assert results and results[0].exit_code == 0


def _wait_into(call: Callable[[], Any], results: list[Any]) -> Callable[[], None]:
    def run() -> None:
        results.append(call())

    return run

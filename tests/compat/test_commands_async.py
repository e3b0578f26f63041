"""`process.Process` with the official e2b SDK (async flavour) against a real server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from e2b import AsyncSandbox, CommandExitException
from e2b.exceptions import (
    AuthenticationException,
    InvalidArgumentException,
    NotFoundException,
    TimeoutException,
)
from packaging.version import Version

pytestmark = pytest.mark.compat


@pytest.fixture
async def asandbox(e2b_env: Any) -> AsyncIterator[AsyncSandbox]:
    sbx = await AsyncSandbox.create(timeout=120)
    try:
        yield sbx
    finally:
        await sbx.kill()


async def test_envd_version(asandbox: AsyncSandbox) -> None:
    assert asandbox._envd_version == Version("0.6.13")


async def test_output_streams_as_it_comes(asandbox: AsyncSandbox) -> None:
    seen: list[tuple[float, str]] = []
    t0 = time.monotonic()

    async def on_stderr(text: str) -> None:  # handlers may be coroutines too
        seen.append((time.monotonic() - t0, text))

    result = await asandbox.commands.run(
        "echo first; sleep 1; echo second >&2",
        on_stdout=lambda text: seen.append((time.monotonic() - t0, text)),
        on_stderr=on_stderr,
    )
    total = time.monotonic() - t0
    assert [text for _, text in seen] == ["first\n", "second\n"]
    assert seen[0][0] < total - 0.7
    assert (result.stdout, result.stderr, result.exit_code, result.error) == ("first\n", "second\n", 0, None)


async def test_exit_code_and_bytes(asandbox: AsyncSandbox) -> None:
    with pytest.raises(CommandExitException) as info:
        await asandbox.commands.run(r"printf 'x\377'; exit 4")
    assert (info.value.exit_code, info.value.error, info.value.stdout) == (4, "exit status 4", "x\ufffd")


async def test_background_connect_from_another_client(asandbox: AsyncSandbox) -> None:
    got_one = asyncio.Event()

    def on_stdout(text: str) -> None:
        if text == "one\n":
            got_one.set()

    gate = "/tmp/connected-go"  # "two" comes once the second client is connected, however loaded
    handle = await asandbox.commands.run(
        f"echo one; while [ ! -e {gate} ]; do sleep 0.05; done; echo two",
        background=True,
        on_stdout=on_stdout,
    )
    await asyncio.wait_for(got_one.wait(), 10)
    await handle.disconnect()
    other = await AsyncSandbox.connect(asandbox.sandbox_id)
    connected = await other.commands.connect(handle.pid)
    await other.commands.run(f"touch {gate}")
    result = await connected.wait()
    assert (result.stdout, result.exit_code) == ("two\n", 0)
    ended = await (await other.commands.connect(handle.pid)).wait()
    assert (ended.stdout, ended.exit_code) == ("", 0)
    with pytest.raises(NotFoundException):
        await other.commands.connect(999999)


async def test_stdin_and_list(asandbox: AsyncSandbox) -> None:
    handle = await asandbox.commands.run("cat", background=True, stdin=True)
    assert handle.pid in {p.pid for p in await asandbox.commands.list()}
    await asandbox.commands.send_stdin(handle.pid, "ping\n")
    await handle.close_stdin()
    result = await handle.wait()
    assert result.stdout == "ping\n"
    assert handle.pid not in {p.pid for p in await asandbox.commands.list()}


async def test_kill(asandbox: AsyncSandbox) -> None:
    handle = await asandbox.commands.run("sleep 100", background=True)
    assert await handle.kill() is True
    with pytest.raises(CommandExitException) as info:
        await handle.wait()
    assert (info.value.exit_code, info.value.error) == (-1, "signal: killed")
    assert await asandbox.commands.kill(handle.pid) is False


async def test_killing_a_running_run(asandbox: AsyncSandbox) -> None:
    async def kill_when_listed() -> None:
        while True:
            for process in await asandbox.commands.list():
                if process.args[-1] == "sleep 100":
                    await asandbox.commands.kill(process.pid)
                    return
            await asyncio.sleep(0.05)

    killer = asyncio.ensure_future(asyncio.wait_for(kill_when_listed(), 10))
    with pytest.raises(CommandExitException) as info:
        await asandbox.commands.run("sleep 100")
    await killer
    assert info.value.exit_code == -1


async def test_users_and_cwd(asandbox: AsyncSandbox) -> None:
    assert (await asandbox.commands.run("whoami; pwd", user="root")).stdout == "root\n/root\n"
    assert (await asandbox.commands.run("pwd", cwd="~")).stdout == "/home/user\n"
    with pytest.raises(AuthenticationException, match="invalid username: 'ghost'"):
        await asandbox.commands.run("true", user="ghost")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentException, match="cwd '/nope' does not exist"):
        await asandbox.commands.run("true", cwd="/nope")


async def test_envs(e2b_env: Any) -> None:
    sbx = await AsyncSandbox.create(envs={"FROM_CREATE": "a"}, timeout=60)
    try:
        assert (await sbx.commands.run("echo $FROM_CREATE $X", envs={"X": "y"})).stdout == "a y\n"
        assert (await sbx.commands.run("echo $FROM_CREATE ${X:-unset}")).stdout == "a unset\n"
    finally:
        await sbx.kill()


async def test_timeout_kills_the_process(asandbox: AsyncSandbox) -> None:
    handle = await asandbox.commands.run("sleep 30", background=True, timeout=1.5)
    with pytest.raises(TimeoutException):
        await handle.wait()
    other = await AsyncSandbox.connect(asandbox.sandbox_id)
    deadline = time.monotonic() + 10
    while handle.pid in {p.pid for p in await other.commands.list()} and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert handle.pid not in {p.pid for p in await other.commands.list()}


async def test_kill_sandbox_mid_stream(e2b_env: Any) -> None:
    sbx = await AsyncSandbox.create(timeout=60)

    async def kill_soon() -> None:  # once the command runs (not after a fixed time: it may start late)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if any(p.args[-1] == "sleep 100" for p in await sbx.commands.list()):
                break
            await asyncio.sleep(0.05)
        await sbx.kill()

    killer = asyncio.ensure_future(kill_soon())
    t0 = time.monotonic()
    with pytest.raises(TimeoutException, match="killed or reached its end of life"):
        await sbx.commands.run("sleep 100")
    await killer
    assert time.monotonic() - t0 < 10
    assert not await sbx.is_running()

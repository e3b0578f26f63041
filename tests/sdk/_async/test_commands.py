"""`sandbox.commands` and `sandbox.pty` against a real sandbox."""

from __future__ import annotations

import time

import pytest

from corral import (
    AsyncCommandHandle,
    AsyncSandbox,
    CommandExitException,
    NotFoundException,
    PtySize,
    TimeoutException,
)

pytestmark = pytest.mark.integration


async def test_run_output_exit_codes_and_options(sandbox: AsyncSandbox) -> None:
    result = await sandbox.commands.run("echo out; echo err >&2")
    assert (result.stdout, result.stderr, result.exit_code, result.error) == ("out\n", "err\n", 0, None)
    with pytest.raises(CommandExitException) as failed:
        await sandbox.commands.run("echo partial; echo oops >&2; exit 3")
    assert (failed.value.exit_code, failed.value.stdout, failed.value.stderr) == (3, "partial\n", "oops\n")
    assert "code 3" in str(failed.value) and "oops" in str(failed.value)
    assert (await sandbox.commands.run("pwd")).stdout == "/home/user\n"
    assert (await sandbox.commands.run("whoami; pwd", user="root", cwd="/tmp")).stdout == "root\n/tmp\n"
    assert (await sandbox.commands.run("echo $A-$B", envs={"A": "1", "B": "two"})).stdout == "1-two\n"


async def test_callbacks_and_utf8_split_across_chunks(sandbox: AsyncSandbox) -> None:
    seen: list[tuple[str, str]] = []

    async def on_stderr(text: str) -> None:
        seen.append(("err", text))

    result = await sandbox.commands.run(
        r"printf '\xe2\x82'; sleep 0.2; printf '\xac\n'; echo warn >&2",
        on_stdout=lambda text: seen.append(("out", text)),
        on_stderr=on_stderr,
    )
    assert result.stdout == "€\n"
    assert "".join(text for stream, text in seen if stream == "out") == "€\n"
    assert ("err", "warn\n") in seen


async def test_background_handle_iterate_list_and_kill(sandbox: AsyncSandbox) -> None:
    handle = await sandbox.commands.run("for i in 1 2 3; do echo $i; sleep 0.05; done", background=True)
    lines = [stdout async for stdout, _stderr, _pty in handle if stdout]
    assert "".join(lines) == "1\n2\n3\n"
    assert (await handle.wait()).exit_code == 0 and handle.exit_code == 0

    sleeper = await sandbox.commands.run("sleep 30", background=True, timeout=0)
    assert sleeper.pid in [process.pid for process in await sandbox.commands.list()]
    assert await sleeper.kill() is True
    with pytest.raises(CommandExitException) as killed:
        await sleeper.wait()
    assert killed.value.exit_code == -1
    assert await sandbox.commands.kill(sleeper.pid) is False
    assert await sandbox.commands.kill(999_999) is False


async def test_stdin_and_close_stdin(sandbox: AsyncSandbox) -> None:
    handle = await sandbox.commands.run("cat; echo EOF", background=True, stdin=True)
    await handle.send_stdin("hello ")
    await sandbox.commands.send_stdin(handle.pid, b"world\n")
    await handle.close_stdin()
    assert (await handle.wait()).stdout == "hello world\nEOF\n"


async def test_disconnect_and_connect(sandbox: AsyncSandbox) -> None:
    gate = "/tmp/reconnected-go"  # "done" comes once connected again, however loaded
    handle = await sandbox.commands.run(
        f"while [ ! -e {gate} ]; do sleep 0.05; done; echo done", background=True
    )
    await handle.disconnect()
    again = await sandbox.commands.connect(handle.pid)
    await sandbox.commands.run(f"touch {gate}")
    assert (await again.wait()).stdout == "done\n"
    with pytest.raises(NotFoundException):
        await sandbox.commands.connect(999_999)


async def test_command_timeout(sandbox: AsyncSandbox) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutException, match="timeout"):
        await sandbox.commands.run("sleep 30", timeout=1)
    assert time.monotonic() - started < 10


async def _read_until(terminal: AsyncCommandHandle, received: bytearray, needle: bytes) -> None:
    """Read the terminal until `needle` has arrived (the shell drops input typed before its prompt)."""
    async for _stdout, _stderr, _pty in terminal:
        if needle in received:
            return
    raise AssertionError(f"{needle!r} never arrived: {bytes(received)!r}")


async def test_pty_size_input_resize_and_exit(sandbox: AsyncSandbox) -> None:
    received = bytearray()
    terminal = await sandbox.pty.create(PtySize(rows=20, cols=91), on_data=received.extend, timeout=30)
    assert terminal.pid in [process.pid for process in await sandbox.commands.list()]
    await _read_until(terminal, received, b"$ ")
    await sandbox.pty.send_stdin(terminal.pid, "tput cols; echo $TERM\n")
    await _read_until(terminal, received, b"xterm-256color")
    await sandbox.pty.resize(terminal.pid, PtySize(rows=20, cols=123))
    await sandbox.pty.send_stdin(terminal.pid, b"tput cols; exit\n")
    async for _stdout, _stderr, _pty in terminal:
        pass
    text = received.decode(errors="replace")
    assert "91\r\n" in text and "123\r\n" in text
    assert terminal.exit_code == 0


async def test_pty_connect_and_kill(sandbox: AsyncSandbox) -> None:
    terminal = await sandbox.pty.create(timeout=30)
    await terminal.disconnect()
    received = bytearray()
    again = await sandbox.pty.connect(terminal.pid, on_data=received.extend)
    await sandbox.pty.send_stdin(terminal.pid, "\n")  # a fresh prompt shows the shell is ready
    await _read_until(again, received, b"$ ")
    await sandbox.pty.send_stdin(terminal.pid, "echo $((40+2))\n")
    await _read_until(again, received, b"42")
    assert await sandbox.pty.kill(terminal.pid) is True
    async for _item in again:  # the stream ends with the shell's end
        pass
    assert again.exit_code == -1
    assert await sandbox.pty.kill(terminal.pid) is False

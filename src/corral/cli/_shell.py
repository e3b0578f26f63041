"""`corral sandbox shell`: the local terminal wired to a PTY in the sandbox.

Three things run at once, in one task group that ends when the remote shell does: the PTY's
output goes to stdout, keystrokes go to the PTY (the local terminal is in raw mode, so Ctrl-C,
Ctrl-D and arrows reach the remote shell as bytes), and SIGWINCH resizes the remote terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import termios
import tty
from collections.abc import Iterator

from corral.sdk import AsyncSandbox, ConnectionOptions, PtySize, SandboxException

__all__ = ["run_shell", "terminal_size"]

_DEFAULT_SIZE = PtySize(rows=24, cols=80)


def terminal_size(fd: int) -> PtySize:
    """The size of the terminal on `fd`, or 24x80 when it is not a terminal."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return _DEFAULT_SIZE
    return PtySize(rows=size.lines or 24, cols=size.columns or 80)


@contextlib.contextmanager
def _raw_terminal(fd: int) -> Iterator[None]:
    """Raw mode for a terminal on `fd` (restored on exit); nothing when it is not one."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def run_shell(
    sandbox_id: str, options: ConnectionOptions, *, user: str | None = None, cwd: str | None = None
) -> int:
    """Run an interactive shell in the sandbox until it exits; its exit code."""
    stdin_fd, stdout_fd = sys.stdin.fileno(), sys.stdout.fileno()
    loop = asyncio.get_running_loop()
    sandbox = await AsyncSandbox.connect(sandbox_id, timeout=0, **options)
    try:
        terminal = await sandbox.pty.create(terminal_size(stdout_fd), user=user, cwd=cwd, timeout=0)
        keys: asyncio.Queue[bytes] = asyncio.Queue()
        resized = asyncio.Event()

        def on_stdin() -> None:
            data = os.read(stdin_fd, 4096)
            if not data:  # stdin closed (not a terminal): end the shell's input too
                loop.remove_reader(stdin_fd)
                data = b"\x04"
            keys.put_nowait(data)

        # Input and resizes stop quietly when the shell is gone: its output stream says how it ended.
        async def type_keys() -> None:
            with contextlib.suppress(SandboxException):
                while True:
                    await sandbox.pty.send_stdin(terminal.pid, await keys.get())

        async def follow_size() -> None:
            with contextlib.suppress(SandboxException):
                while True:
                    await resized.wait()
                    resized.clear()
                    await sandbox.pty.resize(terminal.pid, terminal_size(stdout_fd))

        async def show_output() -> None:
            async for _stdout, _stderr, data in terminal:
                if data:
                    os.write(stdout_fd, data)

        with _raw_terminal(stdin_fd):
            loop.add_reader(stdin_fd, on_stdin)
            loop.add_signal_handler(signal.SIGWINCH, resized.set)
            try:
                async with asyncio.TaskGroup() as group:
                    helpers = [group.create_task(type_keys()), group.create_task(follow_size())]
                    await show_output()
                    for helper in helpers:
                        helper.cancel()
            finally:
                loop.remove_signal_handler(signal.SIGWINCH)
                loop.remove_reader(stdin_fd)
        if terminal.exit_code is None:
            await terminal.kill()
            return 1
        return terminal.exit_code
    finally:
        await sandbox.aclose()

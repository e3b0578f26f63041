"""`sandbox.commands` and `sandbox.pty`: run commands and terminals in the sandbox.

Output is pulled, not pushed: a handle reads its stream while you iterate it or `wait()` for it,
and calls `on_stdout` / `on_stderr` / `on_data` as it goes. (envd buffers a little output for
a process nobody reads and then slows it down; it is never lost while you read.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Literal, overload

from corral.sdk._async._client import AsyncEnvdClient, AsyncRpcStream
from corral.sdk._envd import (
    KEEPALIVE_HEADERS,
    CommandOutput,
    Output,
    close_stdin_message,
    process_selector,
    pty_start_message,
    send_input_message,
    signal_message,
    start_command_message,
    start_pid,
    update_pty_message,
)
from corral.sdk._errors import CommandResult, NotFoundException, SandboxException
from corral.sdk._handlers import AsyncOutputHandler, ainvoke
from corral.sdk._models import DEFAULT_PTY_SIZE, ProcessInfo, PtySize, process_info_from_json

__all__ = ["AsyncCommandHandle", "AsyncCommands", "AsyncPty"]

_PROCESS = "process.Process/"


class AsyncCommandHandle:
    """A running command or PTY session.

    Iterate it for `(stdout, stderr, pty)` triples (one item set), or `await wait()` for the
    result. `disconnect()` stops listening and leaves the process running.
    """

    def __init__(
        self,
        pid: int,
        stream: AsyncRpcStream,
        commands: AsyncCommands,
        on_stdout: AsyncOutputHandler[str] | None = None,
        on_stderr: AsyncOutputHandler[str] | None = None,
        on_pty: AsyncOutputHandler[bytes] | None = None,
    ) -> None:
        self._pid = pid
        self._stream = stream
        self._commands = commands
        self._on_stdout = on_stdout
        self._on_stderr = on_stderr
        self._on_pty = on_pty
        self._output = CommandOutput()

    @property
    def pid(self) -> int:
        """The process id inside the sandbox."""
        return self._pid

    @property
    def stdout(self) -> str:
        """Stdout received so far."""
        return self._output.stdout

    @property
    def stderr(self) -> str:
        """Stderr received so far."""
        return self._output.stderr

    @property
    def exit_code(self) -> int | None:
        """The exit code once the end was received, else None."""
        return self._output.result.exit_code if self._output.result else None

    @property
    def error(self) -> str | None:
        """envd's error text once the end was received (`"exit status 1"`), else None."""
        return self._output.result.error if self._output.result else None

    async def __aiter__(self) -> AsyncIterator[Output]:
        """Output as it arrives: `(stdout, stderr, None)`, `(None, stderr, None)` or `(None, None, pty)`."""
        async for message in self._stream:
            for item in self._output.feed(message):
                stdout, stderr, pty = item
                if stdout is not None:
                    await ainvoke(self._on_stdout, stdout)
                elif stderr is not None:
                    await ainvoke(self._on_stderr, stderr)
                elif pty is not None:
                    await ainvoke(self._on_pty, pty)
                yield item
        for item in self._output.flush():
            yield item

    async def wait(self) -> CommandResult:
        """Read to the end; the result. Raises `CommandExitException` when the exit code is not 0."""
        async for _item in self:
            pass
        return self._output.finish()

    async def disconnect(self) -> None:
        """Stop receiving output; the process keeps running (`commands.connect(pid)` reattaches)."""
        await self._stream.aclose()

    async def kill(self) -> bool:
        """Kill the process (SIGKILL); False when it was already gone."""
        return await self._commands.kill(self._pid)

    async def send_stdin(self, data: str | bytes, request_timeout: float | None = None) -> None:
        """Write to the process's stdin (it must have been started with `stdin=True`)."""
        await self._commands.send_stdin(self._pid, data, request_timeout=request_timeout)

    async def close_stdin(self, request_timeout: float | None = None) -> None:
        """Close the process's stdin (EOF)."""
        await self._commands.close_stdin(self._pid, request_timeout=request_timeout)


class AsyncCommands:
    """Run and manage commands in the sandbox (`sandbox.commands`)."""

    def __init__(self, envd: AsyncEnvdClient) -> None:
        self._envd = envd

    async def list(self, request_timeout: float | None = None) -> list[ProcessInfo]:
        """Every running command and PTY session."""
        response = await self._envd.unary(
            _PROCESS + "List", {}, request_timeout=request_timeout, context="list processes"
        )
        return [process_info_from_json(item) for item in response.get("processes") or []]

    async def kill(self, pid: int, request_timeout: float | None = None) -> bool:
        """Kill a process with SIGKILL; False when there is no such process."""
        try:
            await self._envd.unary(
                _PROCESS + "SendSignal",
                signal_message(pid),
                request_timeout=request_timeout,
                context=f"kill process {pid}",
            )
        except NotFoundException:
            return False
        return True

    async def send_stdin(self, pid: int, data: str | bytes, request_timeout: float | None = None) -> None:
        """Write `data` to a process's stdin."""
        await self._envd.unary(
            _PROCESS + "SendInput",
            send_input_message(pid, data, pty=False),
            request_timeout=request_timeout,
            context=f"send stdin to process {pid}",
        )

    async def close_stdin(self, pid: int, request_timeout: float | None = None) -> None:
        """Close a process's stdin, so it reads EOF."""
        await self._envd.unary(
            _PROCESS + "CloseStdin",
            close_stdin_message(pid),
            request_timeout=request_timeout,
            context=f"close stdin of process {pid}",
        )

    @overload
    async def run(
        self,
        cmd: str,
        background: Literal[False] = False,
        envs: Mapping[str, str] | None = None,
        user: str | None = None,
        cwd: str | None = None,
        on_stdout: AsyncOutputHandler[str] | None = None,
        on_stderr: AsyncOutputHandler[str] | None = None,
        stdin: bool = False,
        timeout: float | None = 60,
        request_timeout: float | None = None,
    ) -> CommandResult: ...

    @overload
    async def run(
        self,
        cmd: str,
        background: Literal[True],
        envs: Mapping[str, str] | None = None,
        user: str | None = None,
        cwd: str | None = None,
        on_stdout: AsyncOutputHandler[str] | None = None,
        on_stderr: AsyncOutputHandler[str] | None = None,
        stdin: bool = False,
        timeout: float | None = 60,
        request_timeout: float | None = None,
    ) -> AsyncCommandHandle: ...

    async def run(
        self,
        cmd: str,
        background: bool = False,
        envs: Mapping[str, str] | None = None,
        user: str | None = None,
        cwd: str | None = None,
        on_stdout: AsyncOutputHandler[str] | None = None,
        on_stderr: AsyncOutputHandler[str] | None = None,
        stdin: bool = False,
        timeout: float | None = 60,
        request_timeout: float | None = None,
    ) -> CommandResult | AsyncCommandHandle:
        """Run `cmd` with `bash -l -c` and wait for it, or return a handle with `background=True`.

        `timeout` (seconds, 0 = none) limits the command's life: envd kills it then and the
        call raises `TimeoutException`. A non-zero exit raises `CommandExitException` (output kept).
        """
        handle = await self._start(
            start_command_message(cmd, envs, cwd, stdin),
            user,
            timeout,
            request_timeout,
            on_stdout,
            on_stderr,
            None,
            "run command",
        )
        if background:
            return handle
        return await handle.wait()

    async def connect(
        self,
        pid: int,
        timeout: float | None = 60,
        request_timeout: float | None = None,
        on_stdout: AsyncOutputHandler[str] | None = None,
        on_stderr: AsyncOutputHandler[str] | None = None,
    ) -> AsyncCommandHandle:
        """Attach to a running process (or one that ended in the last 30 s)."""
        stream = await self._envd.stream(
            _PROCESS + "Connect",
            process_selector(pid),
            timeout=timeout,
            request_timeout=request_timeout,
            headers=KEEPALIVE_HEADERS,
            context=f"connect to process {pid}",
        )
        return await self._handle(stream, on_stdout, on_stderr, None, f"connect to process {pid}")

    async def _start(
        self,
        message: Mapping[str, object],
        user: str | None,
        timeout: float | None,
        request_timeout: float | None,
        on_stdout: AsyncOutputHandler[str] | None,
        on_stderr: AsyncOutputHandler[str] | None,
        on_pty: AsyncOutputHandler[bytes] | None,
        action: str,
    ) -> AsyncCommandHandle:
        stream = await self._envd.stream(
            _PROCESS + "Start",
            message,
            user=user,
            timeout=timeout,
            request_timeout=request_timeout,
            headers=KEEPALIVE_HEADERS,
            context=action,
        )
        return await self._handle(stream, on_stdout, on_stderr, on_pty, action)

    async def _handle(
        self,
        stream: AsyncRpcStream,
        on_stdout: AsyncOutputHandler[str] | None,
        on_stderr: AsyncOutputHandler[str] | None,
        on_pty: AsyncOutputHandler[bytes] | None,
        action: str,
    ) -> AsyncCommandHandle:
        try:
            first = await stream.receive()
            if first is None:
                raise SandboxException(
                    f"{action}: envd closed the stream before the process started", code="unavailable"
                )
            pid = start_pid(first, action)
        except BaseException:
            await stream.aclose()
            raise
        return AsyncCommandHandle(pid, stream, self, on_stdout=on_stdout, on_stderr=on_stderr, on_pty=on_pty)


class AsyncPty:
    """Interactive terminals in the sandbox (`sandbox.pty`)."""

    def __init__(self, envd: AsyncEnvdClient, commands: AsyncCommands) -> None:
        self._envd = envd
        self._commands = commands

    async def create(
        self,
        size: PtySize = DEFAULT_PTY_SIZE,
        on_data: AsyncOutputHandler[bytes] | None = None,
        user: str | None = None,
        cwd: str | None = None,
        envs: Mapping[str, str] | None = None,
        timeout: float | None = 60,
        request_timeout: float | None = None,
    ) -> AsyncCommandHandle:
        """Start `bash -i -l` on a new pseudo-terminal; its output arrives as `pty` bytes.

        `timeout` (seconds, 0 = none) limits the terminal's life.
        """
        return await self._commands._start(
            pty_start_message(size, envs, cwd),
            user,
            timeout,
            request_timeout,
            None,
            None,
            on_data,
            "create pty",
        )

    async def connect(
        self,
        pid: int,
        on_data: AsyncOutputHandler[bytes] | None = None,
        timeout: float | None = 60,
        request_timeout: float | None = None,
    ) -> AsyncCommandHandle:
        """Attach to a running terminal."""
        stream = await self._envd.stream(
            _PROCESS + "Connect",
            process_selector(pid),
            timeout=timeout,
            request_timeout=request_timeout,
            headers=KEEPALIVE_HEADERS,
            context=f"connect to pty {pid}",
        )
        return await self._commands._handle(stream, None, None, on_data, f"connect to pty {pid}")

    async def send_stdin(self, pid: int, data: str | bytes, request_timeout: float | None = None) -> None:
        """Type `data` into the terminal."""
        await self._envd.unary(
            _PROCESS + "SendInput",
            send_input_message(pid, data, pty=True),
            request_timeout=request_timeout,
            context=f"send input to pty {pid}",
        )

    async def resize(self, pid: int, size: PtySize, request_timeout: float | None = None) -> None:
        """Change the terminal's size (the shell gets SIGWINCH)."""
        await self._envd.unary(
            _PROCESS + "Update",
            update_pty_message(pid, size),
            request_timeout=request_timeout,
            context=f"resize pty {pid}",
        )

    async def kill(self, pid: int, request_timeout: float | None = None) -> bool:
        """Kill the terminal's shell (SIGKILL); False when it was already gone."""
        return await self._commands.kill(pid, request_timeout=request_timeout)

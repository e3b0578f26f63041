"""Our ends of a started process's stdio — its pipes, or the master of its pseudo-terminal — and
what envd does with them. The shared half of the two `SpawnedProcess` implementations
(`corral.node.runtime.crun.RuntimeProcess`, `corral.node.runtime.agent.AgentProcess`), which differ
only in how the process is signalled and how its exit is learnt.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import struct
import termios
from collections.abc import Sequence

from corral.core.errors import FailedPrecondition, InvalidArgument
from corral.node.runtime._fdio import write_all
from corral.node.runtime.base import PtySize

__all__ = ["ProcessIo"]


class ProcessIo:
    """Non-blocking fds owned by this object: `stdin_fd`, `stdout_fd`, `stderr_fd`, or `pty_fd`."""

    pid: int

    def __init__(
        self,
        *,
        stdin_fd: int | None = None,
        stdout_fd: int | None = None,
        stderr_fd: int | None = None,
        pty_fd: int | None = None,
    ) -> None:
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd
        self.stderr_fd = stderr_fd
        self.pty_fd = pty_fd
        self._input_lock = asyncio.Lock()
        self._writing: int | None = None  # the input fd a write_input is waiting on
        self._close_after_write = False

    def output_fds(self) -> Sequence[tuple[str, int]]:
        if self.pty_fd is not None:
            return [("pty", self.pty_fd)]
        return [(name, fd) for name, fd in (("stdout", self.stdout_fd), ("stderr", self.stderr_fd)) if fd is not None]

    async def write_input(self, data: bytes) -> None:
        async with self._input_lock:
            fd = self.pty_fd if self.pty_fd is not None else self.stdin_fd
            if fd is None:
                raise InvalidArgument("stdin is not enabled for this process (or it was closed)")
            self._writing = fd
            try:
                await write_all(fd, data)
            except OSError as exc:  # EPIPE: nobody reads any more (the process has exited)
                raise FailedPrecondition(f"cannot write to process {self.pid}: {exc.strerror}") from None
            finally:
                self._writing = None
                if self._close_after_write:
                    self._close_after_write = False
                    os.close(fd)

    def close_stdin(self) -> None:
        fd, self.stdin_fd = self.stdin_fd, None
        if fd is not None:
            self._release(fd)

    def _release(self, fd: int) -> None:
        # A writer may be waiting on this fd: closing it now could hand its number to another file.
        if fd == self._writing:
            self._close_after_write = True
        else:
            os.close(fd)

    def resize(self, size: PtySize) -> None:
        if self.pty_fd is None:
            raise InvalidArgument("process has no pseudo-terminal")
        fcntl.ioctl(self.pty_fd, termios.TIOCSWINSZ, struct.pack("HHHH", size.rows, size.cols, 0, 0))

"""Run a short helper program (mkfs, mount, cp) from async code without forking the server.

`asyncio.create_subprocess_exec` (and uvloop's) forks the whole server process before exec: on
these machines that costs 20-70 ms per call once the server holds a few hundred MB and the host
is busy, and it blocks the event loop meanwhile. `os.posix_spawn` uses vfork (CLONE_VM): about 3 ms.
The child's exit is awaited through a pidfd, so no SIGCHLD machinery is involved.

    done = await run(["mkfs.ext4", "-q", image])     # Completed(returncode, stdout, stderr)
    done.check("making the disk")                    # Internal with stderr when it failed
    await run(["nft", "-f", "-"], stdin=script)      # `stdin`: bytes fed to the child, then EOF
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
from collections.abc import Sequence

from corral.core.errors import Internal
from corral.node.runtime._fdio import read_chunk, wait_readable, write_all

__all__ = ["Completed", "run"]


@dataclasses.dataclass(frozen=True, slots=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int  # -N when killed by signal N
    stdout: bytes
    stderr: bytes

    def check(self, what: str) -> Completed:
        if self.returncode != 0:
            detail = (self.stderr or self.stdout).decode(errors="replace").strip()
            raise Internal(f"{what} failed ({self.argv[0]} exited with {self.returncode}): {detail}")
        return self


def _resolve(program: str) -> str:
    if "/" in program:
        return program
    found = shutil.which(program)
    if found is None:
        raise Internal(f"'{program}' not found on PATH")
    return found


async def _drain(fd: int) -> bytes:
    chunks = []
    while chunk := await read_chunk(fd):
        chunks.append(chunk)
    return b"".join(chunks)


async def _feed(fd: int, data: bytes) -> None:
    try:
        await write_all(fd, data)
    except BrokenPipeError:
        pass  # the child exited without reading it all: its exit status says why
    finally:
        os.close(fd)


async def run(argv: Sequence[str], *, stdin: bytes | None = None) -> Completed:
    """Run `argv` with `stdin` as its input (default /dev/null); collect stdout and stderr; never
    raises on exit status. Cancelling it kills the child."""
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    in_r, in_w = os.pipe2(os.O_CLOEXEC) if stdin is not None else (-1, -1)
    actions = [
        (os.POSIX_SPAWN_DUP2, in_r, 0) if stdin is not None else (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, out_w, 1),
        (os.POSIX_SPAWN_DUP2, err_w, 2),
    ]
    try:
        # vfork + exec: returns as soon as the child has exec'd; that is the point of this module.
        pid = os.posix_spawn(_resolve(argv[0]), list(argv), os.environ, file_actions=actions)  # noqa: ASYNC221
    except BaseException:
        for fd in (out_r, out_w, err_r, err_w, in_r, in_w):
            if fd >= 0:
                os.close(fd)
        raise
    os.close(out_w)
    os.close(err_w)
    if stdin is not None:
        os.close(in_r)
        os.set_blocking(in_w, False)
    pidfd = os.pidfd_open(pid)
    info = None
    try:
        for fd in (out_r, err_r):
            os.set_blocking(fd, False)
        feeding = _feed(in_w, stdin) if stdin is not None else asyncio.sleep(0)
        stdout, stderr, _ = await asyncio.gather(_drain(out_r), _drain(err_r), feeding)
        await wait_readable(pidfd)
        info = os.waitid(os.P_PIDFD, pidfd, os.WEXITED)  # noqa: ASYNC222 - the pidfd says it has exited
    finally:
        if info is None:  # cancelled or failed while it runs: end it, and never leave a zombie
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitid(os.P_PIDFD, pidfd, os.WEXITED)  # noqa: ASYNC222 - SIGKILLed: ends at once
        for fd in (out_r, err_r, pidfd):
            os.close(fd)
    assert info is not None
    code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
    return Completed(tuple(argv), code, stdout, stderr)

"""Small asyncio helpers over raw non-blocking file descriptors (pipes, pty masters, pidfds).

They wait with `loop.add_reader`/`add_writer` (epoll), so no thread is involved and a cancelled
wait leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select

__all__ = ["CHUNK_SIZE", "is_readable_now", "read_chunk", "wait_readable", "wait_writable", "write_all"]

CHUNK_SIZE = 65536


async def _wait(fd: int, writable: bool) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if writable:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def wait_readable(fd: int) -> None:
    await _wait(fd, writable=False)


async def wait_writable(fd: int) -> None:
    await _wait(fd, writable=True)


def is_readable_now(fd: int) -> bool:
    """True when a read (or, for a pidfd, waitid) would not block."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


async def read_chunk(fd: int, size: int = CHUNK_SIZE) -> bytes:
    """Read what is there (at most `size`), waiting if nothing is; b"" at EOF (or EIO on a pty master)."""
    while True:
        try:
            return os.read(fd, size)
        except BlockingIOError:
            await wait_readable(fd)
        except OSError as exc:
            if exc.errno == errno.EIO:  # pty master after the last slave closed
                return b""
            raise


async def write_all(fd: int, data: bytes) -> None:
    """Write everything, waiting while the reader is slow (back-pressure instead of a buffer)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            await wait_writable(fd)

"""Small asyncio helpers over raw file descriptors (pipes, pty masters, pidfds)."""

from __future__ import annotations

import asyncio
import errno
import os

__all__ = ["read_chunk", "wait_readable", "write_all"]


async def wait_readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def read_chunk(fd: int, size: int = 65536) -> bytes:
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
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
            view = view[n:]
        except BlockingIOError:
            ready = loop.create_future()
            loop.add_writer(fd, lambda: ready.done() or ready.set_result(None))
            try:
                await ready
            finally:
                loop.remove_writer(fd)

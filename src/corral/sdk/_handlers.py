"""Callback types and how each twin calls them (hand-written pairs, like httpcore's
`_synchronization.py`): the async source calls `ainvoke`/`asleep`, the generated sync code the
same lines with `invoke`/`sleep`.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ["AsyncOutputHandler", "OutputHandler", "ainvoke", "asleep", "invoke", "sleep"]

T = TypeVar("T")

AsyncOutputHandler = Callable[[T], Awaitable[None] | None]
"""A callback of the async SDK: a plain function or a coroutine function."""

OutputHandler = Callable[[T], None]
"""A callback of the sync SDK."""


async def ainvoke(handler: AsyncOutputHandler[T] | None, value: T) -> None:
    """Call `handler(value)` and await it when it returns an awaitable."""
    if handler is None:
        return
    result = handler(value)
    if inspect.isawaitable(result):
        await result


def invoke(handler: OutputHandler[T] | None, value: T) -> None:
    """Call `handler(value)`."""
    if handler is not None:
        handler(value)


async def asleep(seconds: float) -> None:
    """Pause this task."""
    await asyncio.sleep(seconds)


def sleep(seconds: float) -> None:
    """Pause this thread."""
    time.sleep(seconds)

"""Run a little work inside a network namespace (a sandbox's), from a short-lived thread.

setns(CLONE_NEWNET) changes only the calling thread, and what that thread then opens — sockets,
files under /proc/sys/net — belongs to the namespace it is in. A thread of its own joins, works,
joins back and ends, so no pool thread is ever left in a sandbox's namespace and no `nsenter`
process is spawned. The caller blocks for the join (the work is a bind or a sysctl write).

`set_sysctls` is the common work: per-namespace `net.*` settings, written from the host's user
namespace, which owns the sandbox's netns (root in a sandbox's own user namespace may not).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
from collections.abc import Callable, Mapping
from typing import TypeVar

from corral.core.errors import Internal

__all__ = ["CLONE_NEWNET", "run_in_netns", "set_sysctls"]

CLONE_NEWNET = 0x40000000
T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns {what}: {os.strerror(err)}")


def run_in_netns(netns_path: str, work: Callable[[], T], *, name: str = "corral-netns") -> T:
    """`work()` run in the network namespace at `netns_path` (e.g. `/proc/<pid>/ns/net`); its
    result, or its exception (OSError when the namespace cannot be joined)."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def thread_main() -> None:
        try:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                target = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _setns(target, netns_path)
                    try:
                        outcome.append(work())
                    finally:
                        _setns(own, "back")  # if this fails, the thread still ends here
                finally:
                    os.close(target)
            finally:
                os.close(own)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, which raises it
            failure.append(exc)

    thread = threading.Thread(target=thread_main, name=name, daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


async def set_sysctls(netns_path: str, values: Mapping[str, str]) -> None:
    """Set `values` (`"net/ipv4/ping_group_range": "0 2147483647"`: keys are paths under /proc/sys)
    in the network namespace at `netns_path`, from a setns'd thread (no `nsenter` process).
    Internal on failure."""

    def write() -> None:
        for key, value in values.items():
            fd = os.open(f"/proc/sys/{key}", os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, f"{value}\n".encode())
            finally:
                os.close(fd)

    try:
        await asyncio.to_thread(run_in_netns, netns_path, write, name="corral-netns-sysctl")
    except OSError as exc:
        raise Internal(f"cannot set {', '.join(values)} in {netns_path}: {exc}") from None

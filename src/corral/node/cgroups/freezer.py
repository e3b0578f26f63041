"""The cgroup freezer, written directly: what `crun pause` / `crun resume` do, without a process.

Spawning the runtime costs a fork of the server (tens of ms when it is large and the host busy);
writing the freezer file costs microseconds. crun reads the same freezer state, so `crun state`
and `crun list` report a sandbox frozen here as `paused`, and `crun resume` thaws it.

v1: `freezer.state` <- FROZEN | THAWED; FREEZING while the kernel stops the tasks.
v2: `cgroup.freeze` <- 1 | 0; `cgroup.events` says `frozen 1` once done.
"""

from __future__ import annotations

import asyncio
import time

from corral.node.cgroups.readings import CgroupPaths, freezer_state

__all__ = ["FreezeTimeout", "freeze", "thaw"]

_POLL_S = 0.001


class FreezeTimeout(Exception):
    """The kernel did not finish freezing the cgroup in time (a task stuck in uninterruptible sleep)."""


def _write(paths: CgroupPaths, frozen: bool) -> None:
    if paths.version == 1:
        (paths.freezer / "freezer.state").write_text("FROZEN" if frozen else "THAWED")
    else:
        (paths.freezer / "cgroup.freeze").write_text("1" if frozen else "0")


def _done(paths: CgroupPaths, frozen: bool) -> bool:
    if paths.version == 1:
        return freezer_state(paths) == ("FROZEN" if frozen else "THAWED")
    events = (paths.freezer / "cgroup.events").read_text()
    return f"frozen {1 if frozen else 0}" in events


async def freeze(paths: CgroupPaths, timeout_s: float = 10.0) -> None:
    """Freeze every task of the cgroup and wait until the kernel says it is frozen.

    On timeout the cgroup is thawed again and `FreezeTimeout` raised: half-frozen is no state to leave.
    OSError when the cgroup does not exist.
    """
    _write(paths, True)
    deadline = time.monotonic() + timeout_s
    delay = _POLL_S
    while not _done(paths, True):
        if time.monotonic() > deadline:
            _write(paths, False)
            raise FreezeTimeout(f"cgroup {paths.freezer} did not freeze within {timeout_s} s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


async def thaw(paths: CgroupPaths) -> None:
    """Let the cgroup's tasks run again (immediate in the kernel; we still wait to see it)."""
    _write(paths, False)
    delay = _POLL_S
    for _ in range(200):
        if _done(paths, False):
            return
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)

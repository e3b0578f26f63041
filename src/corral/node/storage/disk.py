"""A sandbox's own disk: a sparse ext4 image, loop-mounted, that holds its overlay upper and work dirs.

Why: the host filesystem (ext4 without project quotas) cannot limit one directory, and a sandbox
must hit a clear ENOSPC at its `diskSizeMB` without filling the host. A sparse image costs only
what is written; `mkfs.ext4` with lazy inode-table and journal init plus the loop mount take
about 20-40 ms on these machines, so every sandbox gets one. tmpfs would be as fast but lives in
memory and would not survive a host reboot or a stopped (filesystem-only paused) sandbox.

    plan = disk_plan(sandbox_dir, size_mb)      # pure: where the image, mount and dirs are
    await create_disk(plan); await mount_disk(plan)
    disk_usage(plan.mountpoint)                 # (used, total) bytes, for metrics

The mount is `-o loop`, so the loop device is released when the last mount of the image goes
(a lazy unmount, or the sandbox's mount namespace ending, whichever is later).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from corral.node import spawn
from corral.node.storage.mounts import is_mountpoint, unmount

__all__ = [
    "DiskPlan",
    "create_disk",
    "disk_plan",
    "disk_usage",
    "mkfs_argv",
    "mount_argv",
    "mount_disk",
    "unmount_disk",
]

# Lazy init makes mkfs write almost nothing; no reserved blocks: the whole size is the sandbox's.
_MKFS_OPTIONS = ("-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard")
_MOUNT_OPTIONS = "loop,noatime,nosuid,nodev"


@dataclasses.dataclass(frozen=True, slots=True)
class DiskPlan:
    image: Path  # the sparse image file
    mountpoint: Path  # where it is mounted on the host
    size_mb: int

    @property
    def upper(self) -> Path:
        return self.mountpoint / "upper"

    @property
    def work(self) -> Path:
        return self.mountpoint / "work"


def disk_plan(sandbox_dir: Path, size_mb: int) -> DiskPlan:
    return DiskPlan(image=sandbox_dir / "disk.img", mountpoint=sandbox_dir / "disk", size_mb=size_mb)


def mkfs_argv(plan: DiskPlan) -> list[str]:
    return ["mkfs.ext4", *_MKFS_OPTIONS, str(plan.image)]


def mount_argv(plan: DiskPlan) -> list[str]:
    return ["mount", "-t", "ext4", "-o", _MOUNT_OPTIONS, str(plan.image), str(plan.mountpoint)]


async def _run(argv: list[str]) -> None:
    (await spawn.run(argv)).check(f"{argv[0]} of a sandbox disk")


async def create_disk(plan: DiskPlan) -> None:
    """Make the sparse image and its filesystem (the image must not exist yet)."""
    if plan.size_mb <= 0:
        raise ValueError("a sandbox disk needs a positive size")
    fd = os.open(plan.image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, plan.size_mb * 1024 * 1024)
    finally:
        os.close(fd)
    await _run(mkfs_argv(plan))


async def mount_disk(plan: DiskPlan) -> None:
    """Mount the image (no-op when it already is) and make sure upper/ and work/ exist on it."""
    plan.mountpoint.mkdir(exist_ok=True, mode=0o700)
    if not is_mountpoint(plan.mountpoint):
        await _run(mount_argv(plan))
    for sub in (plan.upper, plan.work):
        sub.mkdir(exist_ok=True, mode=0o755)


def unmount_disk(plan: DiskPlan) -> None:
    unmount(plan.mountpoint)


def disk_usage(mountpoint: Path) -> tuple[int, int]:
    """(used, total) bytes of the filesystem mounted at `mountpoint`."""
    st = os.statvfs(mountpoint)
    total = st.f_blocks * st.f_frsize
    return total - st.f_bfree * st.f_frsize, total

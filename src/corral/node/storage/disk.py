"""A sandbox's own disk: a sparse ext4 image, loop-mounted, that holds its overlay upper and work dirs.

Why: the host filesystem (ext4 without project quotas) cannot limit one directory, and a sandbox
must hit a clear ENOSPC at its `diskSizeMB` without filling the host. A sparse image costs only
what is written; `mkfs.ext4` with lazy inode-table and journal init plus the loop mount take
about 20-40 ms on these machines, so every sandbox gets one. tmpfs would be as fast but lives in
memory and would not survive a host reboot or a stopped (filesystem-only paused) sandbox.

    plan = disk_plan(sandbox_dir, size_mb, golden_dir)  # pure: where the image, mount and dirs are
    await create_disk(plan); await mount_disk(plan)
    disk_usage(plan.mountpoint)                 # (used, total) bytes, for metrics

The loop device is autoclear (as with `mount -o loop`), so it is released when the last mount of
the image goes (a lazy unmount, or the sandbox's mount namespace ending, whichever is later).

Speed (`corral.node.storage.loop`): with a `golden_dir`, the first image of each size is made
with mkfs and kept there; later images are sparse copies of it (~1 MB of data, ~1 ms instead of a
mkfs process). The mount is made with LOOP_CONFIGURE and mount(2), not a `mount` process. The
copies share the golden image's filesystem UUID, which nothing here looks at.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import uuid
from pathlib import Path

from corral.node import spawn
from corral.node.storage.loop import MS_NOATIME, MS_NODEV, MS_NOSUID, copy_sparse, mount_image
from corral.node.storage.mounts import is_mountpoint, unmount

__all__ = [
    "DiskPlan",
    "create_disk",
    "disk_plan",
    "disk_usage",
    "golden_image",
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
    golden_dir: Path | None = None  # where freshly made images are kept to copy (None: mkfs each)

    @property
    def upper(self) -> Path:
        return self.mountpoint / "upper"

    @property
    def work(self) -> Path:
        return self.mountpoint / "work"


def disk_plan(sandbox_dir: Path, size_mb: int, golden_dir: Path | None = None) -> DiskPlan:
    return DiskPlan(
        image=sandbox_dir / "disk.img", mountpoint=sandbox_dir / "disk", size_mb=size_mb, golden_dir=golden_dir
    )


def mkfs_argv(plan: DiskPlan, image: Path | None = None) -> list[str]:
    return ["mkfs.ext4", *_MKFS_OPTIONS, str(image or plan.image)]


def golden_image(plan: DiskPlan) -> Path | None:
    """Where the fresh image a plan's disk is copied from lives (named by size and mkfs options)."""
    if plan.golden_dir is None:
        return None
    options = hashlib.sha256(" ".join(_MKFS_OPTIONS).encode()).hexdigest()[:12]
    return plan.golden_dir / f"ext4-{plan.size_mb}m-{options}.img"


def mount_argv(plan: DiskPlan) -> list[str]:
    return ["mount", "-t", "ext4", "-o", _MOUNT_OPTIONS, str(plan.image), str(plan.mountpoint)]


async def _run(argv: list[str]) -> None:
    (await spawn.run(argv)).check(f"{argv[0]} of a sandbox disk")


def _sparse_file(path: Path, size_mb: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size_mb * 1024 * 1024)
    finally:
        os.close(fd)


async def _ensure_golden(plan: DiskPlan, golden: Path) -> None:
    """Make the golden image once (concurrent first makers each write their own and rename)."""
    if golden.exists():
        return
    golden.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = golden.with_name(f".{golden.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        _sparse_file(tmp, plan.size_mb)
        await _run(mkfs_argv(plan, tmp))
        os.replace(tmp, golden)
    finally:
        tmp.unlink(missing_ok=True)


async def create_disk(plan: DiskPlan) -> None:
    """Make the sparse image and its filesystem (the image must not exist yet)."""
    if plan.size_mb <= 0:
        raise ValueError("a sandbox disk needs a positive size")
    golden = golden_image(plan)
    if golden is None:
        _sparse_file(plan.image, plan.size_mb)
        await _run(mkfs_argv(plan))
        return
    await _ensure_golden(plan, golden)
    await asyncio.to_thread(copy_sparse, golden, plan.image)


async def mount_disk(plan: DiskPlan) -> None:
    """Mount the image (no-op when it already is) and make sure upper/ and work/ exist on it."""
    await asyncio.to_thread(_mount, plan)  # file system work stalls under load: not on the event loop


def _mount(plan: DiskPlan) -> None:
    plan.mountpoint.mkdir(exist_ok=True, mode=0o700)
    if not is_mountpoint(plan.mountpoint):  # what `mount_argv` does, without a process
        mount_image(plan.image, plan.mountpoint, "ext4", MS_NOATIME | MS_NOSUID | MS_NODEV)
    for sub in (plan.upper, plan.work):
        sub.mkdir(exist_ok=True, mode=0o755)


def unmount_disk(plan: DiskPlan) -> None:
    unmount(plan.mountpoint)


def disk_usage(mountpoint: Path) -> tuple[int, int]:
    """(used, total) bytes of the filesystem mounted at `mountpoint`."""
    st = os.statvfs(mountpoint)
    total = st.f_blocks * st.f_frsize
    return total - st.f_bfree * st.f_frsize, total

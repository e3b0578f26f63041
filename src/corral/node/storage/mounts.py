"""Mounts as data (`Mount`) and the two syscalls that apply them."""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import errno
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["Mount", "apply_mount", "is_mountpoint", "overlay_mount", "unmount"]

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_MNT_DETACH = 2


@dataclasses.dataclass(frozen=True, slots=True)
class Mount:
    fstype: str
    source: str
    target: str
    options: tuple[str, ...] = ()


def overlay_mount(layers: Sequence[Path], upper: Path, work: Path, target: Path) -> Mount:
    """The overlay of read-only `layers` (lowest first) under a private writable `upper`."""
    lower = ":".join(str(p) for p in reversed(layers))
    return Mount(
        fstype="overlay",
        source="overlay",
        target=str(target),
        options=(f"lowerdir={lower}", f"upperdir={upper}", f"workdir={work}", "xino=off"),
    )


def apply_mount(mount: Mount) -> None:
    data = ",".join(mount.options).encode()
    if _libc.mount(mount.source.encode(), mount.target.encode(), mount.fstype.encode(), 0, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {mount.fstype} on {mount.target}: {os.strerror(err)}")


def unmount(target: Path) -> None:
    """Lazy unmount; a target that is not mounted is fine."""
    if _libc.umount2(str(target).encode(), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, f"umount {target}: {os.strerror(err)}")


def is_mountpoint(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)

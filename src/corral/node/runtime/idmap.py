"""User namespaces for sandboxes (opt-in, `CORRAL_USERNS=1`): sandbox uids 0..65535 map to an
unprivileged host range of their own, so sandbox root (what `sudo` gives) is not host root.

The plan is data (`IdMap`, `pick_base`); the executor makes the idmapped mounts:

- Each sandbox gets `SANDBOX_IDS` host ids from `FIRST_BASE` up, one slot per sandbox (never shared,
  so an escaped process of one sandbox does not own another's files). The base is kept in the
  sandbox directory (`idmap` file) and in its config.json.
- Template layers stay owned by host root on disk. Each is bind-mounted *idmapped* (host id N shows
  as base+N) before the overlay is made from them; the kernel keeps a private clone of each layer in
  the overlay, so the binds are detached right away and nothing is left to unmount. The overlay
  itself cannot be idmapped (EINVAL), and an idmapped upper layer makes the overlay read-only, so
  the sandbox's writable layer holds host ids base+N: its root directory is chowned to base.
- crun then runs the sandbox in a new user namespace with that mapping (`IdMap.oci_mappings`).

Not done yet (see docs/security.md), which is why the flag is off: envd's file API chowns new
files to sandbox uids from the host side and must use `IdMap.to_host` / `from_host`; committing a
writable layer as a template layer must shift ids back.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import struct
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "FIRST_BASE",
    "SANDBOX_IDS",
    "IdMap",
    "config_idmap",
    "idmapped_layers",
    "pick_base",
    "read_idmap",
    "release_layers",
    "userns_fd",
    "write_idmap",
]

SANDBOX_IDS = 65536
FIRST_BASE = 1 << 20  # above the usual /etc/subuid ranges (100000 + 65536 per login user)
MAX_SLOTS = 4096  # 2^20 + 4096 * 2^16 = 2^28 host ids: far below the 2^32 - 1 limit


@dataclasses.dataclass(frozen=True, slots=True)
class IdMap:
    """Sandbox ids [0, size) ↔ host ids [base, base + size)."""

    base: int
    size: int = SANDBOX_IDS

    def to_host(self, sandbox_id: int) -> int:
        if not 0 <= sandbox_id < self.size:
            raise ValueError(f"id {sandbox_id} is outside the sandbox's range [0, {self.size})")
        return self.base + sandbox_id

    def from_host(self, host_id: int) -> int | None:
        """The sandbox id of a host id; None when it is not mapped (shows as 65534 inside)."""
        return host_id - self.base if self.base <= host_id < self.base + self.size else None

    def oci_mappings(self) -> list[dict[str, int]]:
        return [{"containerID": 0, "hostID": self.base, "size": self.size}]


def pick_base(used: Iterable[int]) -> int:
    """The lowest free slot's base, given the bases of the sandboxes that exist."""
    taken = set(used)
    for slot in range(MAX_SLOTS):
        base = FIRST_BASE + slot * SANDBOX_IDS
        if base not in taken:
            return base
    raise RuntimeError(f"all {MAX_SLOTS} user-namespace slots are in use")


def read_idmap(sandbox_dir: Path) -> IdMap | None:
    try:
        return IdMap(int((sandbox_dir / "idmap").read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        return None


def write_idmap(sandbox_dir: Path, idmap: IdMap) -> None:
    (sandbox_dir / "idmap").write_text(f"{idmap.base} {idmap.size}\n")


# -- executor (root, Linux >= 5.12) --------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442  # x86-64 and arm64 alike
_OPEN_TREE_CLONE = 1
_AT_EMPTY_PATH = 0x1000
_AT_FDCWD = -100
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_IDMAP = 0x00100000
_MNT_DETACH = 2


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def userns_fd(idmap: IdMap, timeout_s: float = 5.0) -> int:
    """An fd of a new user namespace with `idmap` (what `mount_setattr` needs to idmap a mount).

    A short-lived `unshare --user` child holds the namespace while we write its maps; the fd keeps
    the namespace alive after the child is gone. (No fork of this threaded process.)
    """
    child = subprocess.Popen(["unshare", "--user", "--", "sleep", "30"], stdin=subprocess.DEVNULL)
    try:
        ours = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + timeout_s
        while os.readlink(f"/proc/{child.pid}/ns/user") == ours:
            if time.monotonic() > deadline or child.poll() is not None:
                raise OSError(f"unshare --user did not make a user namespace (exit {child.poll()})")
            time.sleep(0.0005)
        mapping = f"0 {idmap.base} {idmap.size}\n"
        Path(f"/proc/{child.pid}/uid_map").write_text(mapping)
        Path(f"/proc/{child.pid}/setgroups").write_text("deny\n")
        Path(f"/proc/{child.pid}/gid_map").write_text(mapping)
        return os.open(f"/proc/{child.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        child.kill()
        child.wait()


def _idmapped_bind(source: Path, target: Path, ns_fd: int) -> None:
    tree = _check(
        _libc.syscall(_SYS_OPEN_TREE, _AT_FDCWD, str(source).encode(), _OPEN_TREE_CLONE | os.O_CLOEXEC),
        f"open_tree {source}",
    )
    try:
        attr = ctypes.create_string_buffer(struct.pack("QQQQ", _MOUNT_ATTR_IDMAP, 0, 0, ns_fd))
        _check(_libc.syscall(_SYS_MOUNT_SETATTR, tree, b"", _AT_EMPTY_PATH, attr, 32), f"idmap {source}")
        _check(
            _libc.syscall(
                _SYS_MOVE_MOUNT, tree, b"", _AT_FDCWD, str(target).encode(), _MOVE_MOUNT_F_EMPTY_PATH
            ),
            f"move_mount {target}",
        )
    finally:
        os.close(tree)


def idmapped_layers(layers: Sequence[Path], into: Path, idmap: IdMap) -> list[Path]:
    """Idmapped binds of `layers` at `into/0`, `into/1` … (same order). Detach them with
    `release_layers` once the overlay is mounted (it keeps its own clones)."""
    into.mkdir(mode=0o700, exist_ok=True)
    ns_fd = userns_fd(idmap)
    targets: list[Path] = []
    try:
        for index, layer in enumerate(layers):
            target = into / str(index)
            target.mkdir(exist_ok=True)
            _idmapped_bind(layer, target, ns_fd)
            targets.append(target)
    except BaseException:
        release_layers(targets)
        raise
    finally:
        os.close(ns_fd)
    return targets


def release_layers(targets: Iterable[Path]) -> None:
    for target in targets:
        _libc.umount2(str(target).encode(), _MNT_DETACH)
        try:
            target.rmdir()
        except OSError:
            pass


def config_idmap(config: dict[str, Any]) -> IdMap | None:
    """The mapping a config.json was written with (None without a user namespace)."""
    mappings = config.get("linux", {}).get("uidMappings") or []
    return IdMap(mappings[0]["hostID"], mappings[0]["size"]) if mappings else None

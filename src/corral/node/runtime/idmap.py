"""User namespaces for sandboxes (on by default on crun; `CORRAL_USERNS=0` turns them off for new
sandboxes): sandbox uids 0..65535 map to an unprivileged host range of their own, so sandbox root
(what `sudo` gives) is not host root.

The plan is data (`IdMap`, `pick_base`, `unshift_fscap`, `unshift_acl`); the executors make the
idmapped mounts and shift committed trees back:

- Each sandbox gets `SANDBOX_IDS` host ids from `FIRST_BASE` up, one slot per sandbox (never shared,
  so an escaped process of one sandbox does not own another's files). The base is chosen when the
  sandbox is created and kept in the sandbox directory (`idmap` file, also in its config.json), so
  cold boots and a restarted server's adoption use the same one; a sandbox without the file runs
  without a user namespace (made with the switch off, or on runsc, whose Sentry has its own).
- Template layers stay owned by host root on disk (sandbox id N is stored as host id N). Each is
  bind-mounted *idmapped* (host id N shows as base+N) before the overlay is made from them; the
  kernel keeps a private clone of each layer in the overlay, so the binds are detached right away
  and nothing is left to unmount. The overlay itself cannot be idmapped (EINVAL), and an idmapped
  upper layer makes the overlay read-only, so the sandbox's writable layer holds host ids base+N:
  its root directory is chowned to base.
- crun then runs the sandbox in a new user namespace with that mapping (`IdMap.oci_mappings`).
  Its network namespace stays the host user namespace's (the node made it), so `LOW_PORTS_SYSCTLS`
  lets root inside bind ports below 1024 there.
- Everything the host does in a sandbox's tree speaks host ids: envd's file API (`ConfinedRoot`
  with an `IdMap`) chowns to `to_host(uid)` and reports `from_host(st_uid)`.
- A writable layer that becomes a template layer (snapshots, forks, build steps) is copied and then
  shifted back by `unshift_tree` (base+N → N, setuid/setgid bits, file capabilities and POSIX ACLs
  kept), so layers on disk never carry one sandbox's range. Ids outside the range (whiteouts the
  overlay made as host root) are left alone.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import errno
import os
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "FIRST_BASE",
    "LOW_PORTS_SYSCTLS",
    "OVERFLOW_ID",
    "SANDBOX_IDS",
    "IdMap",
    "config_idmap",
    "idmapped_layers",
    "pick_base",
    "read_idmap",
    "release_layers",
    "unshift_acl",
    "unshift_fscap",
    "unshift_tree",
    "userns_fd",
    "write_idmap",
]

SANDBOX_IDS = 65536
FIRST_BASE = 1 << 20  # above the usual /etc/subuid ranges (100000 + 65536 per login user)
MAX_SLOTS = 4096  # 2^20 + 4096 * 2^16 = 2^28 host ids: far below the 2^32 - 1 limit
OVERFLOW_ID = 65534  # what the kernel shows inside for a host id outside the sandbox's range


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

    def as_seen_inside(self, host_id: int) -> int:
        """The id a process in the sandbox sees for a host id (`OVERFLOW_ID` when unmapped)."""
        inside = self.from_host(host_id)
        return OVERFLOW_ID if inside is None else inside

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


class _NamespaceCache:
    """User namespaces made by `userns_fd`, kept by mapping for reuse: the slot a destroyed sandbox
    frees is the next create's (`pick_base` takes the lowest), so its namespace is reused instead
    of spawning `unshare` again (~3-5 ms of every boot). An idle user namespace holds no process
    and grants nothing; the least recently used are closed beyond `size`."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._fds: collections.OrderedDict[IdMap, int] = collections.OrderedDict()
        self._lock = threading.Lock()

    def acquire(self, idmap: IdMap) -> int:
        """An fd of a user namespace with `idmap`, the caller's to close."""
        with self._lock:
            fd = self._fds.get(idmap)
            if fd is not None:
                self._fds.move_to_end(idmap)
                return os.dup(fd)
        made = userns_fd(idmap)  # outside the lock: other boots need not wait for it
        with self._lock:
            if idmap in self._fds:  # made meanwhile by another boot of the same slot
                os.close(made)
            else:
                self._fds[idmap] = made
                while len(self._fds) > self._size:
                    os.close(self._fds.popitem(last=False)[1])
            return os.dup(self._fds[idmap])


_namespaces = _NamespaceCache(64)


def idmapped_layers(layers: Sequence[Path], into: Path, idmap: IdMap) -> list[Path]:
    """Idmapped binds of `layers` at `into/0`, `into/1` … (same order). Detach them with
    `release_layers` once the overlay is mounted (it keeps its own clones)."""
    into.mkdir(mode=0o700, exist_ok=True)
    ns_fd = _namespaces.acquire(idmap)
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


# The sandbox's netns belongs to the host's user namespace, so root in the sandbox's own user
# namespace has no CAP_NET_BIND_SERVICE there: everyone in it may bind ports below 1024 (as Docker
# does). Set with `corral.node.network.in_netns.set_sysctls`.
LOW_PORTS_SYSCTLS = {"net/ipv4/ip_unprivileged_port_start": "0"}


def config_idmap(config: dict[str, Any]) -> IdMap | None:
    """The mapping a config.json was written with (None without a user namespace)."""
    mappings = config.get("linux", {}).get("uidMappings") or []
    return IdMap(mappings[0]["hostID"], mappings[0]["size"]) if mappings else None


# -- shifting a committed layer back to sandbox ids ----------------------------------------------

_FSCAP = "security.capability"
_ACLS = ("system.posix_acl_access", "system.posix_acl_default")
_CAP_REVISION_MASK = 0xFF000000
_CAP_REVISION_2 = 0x02000000
_CAP_REVISION_3 = 0x03000000
_CAP_V2_SIZE, _CAP_V3_SIZE = 20, 24  # magic_etc, 2 x (permitted, inheritable)[, rootid]
_ACL_USER, _ACL_GROUP = 0x02, 0x08  # the tags whose entries name an id


def unshift_fscap(value: bytes, idmap: IdMap) -> bytes | None:
    """A `security.capability` value as the host reads it, made relative to host ids again: a v3
    value whose root id is the sandbox's base+N gets root id N (a v2 value when N is 0, which is
    what host root writes). None when there is nothing to change."""
    if len(value) != _CAP_V3_SIZE:
        return None
    (magic,) = struct.unpack_from("<I", value)
    if magic & _CAP_REVISION_MASK != _CAP_REVISION_3:
        return None
    inside = idmap.from_host(struct.unpack_from("<I", value, _CAP_V2_SIZE)[0])
    if inside is None:
        return None
    if inside == 0:
        v2_magic = _CAP_REVISION_2 | (magic & ~_CAP_REVISION_MASK & 0xFFFFFFFF)
        return struct.pack("<I", v2_magic) + value[4:_CAP_V2_SIZE]
    return value[:_CAP_V2_SIZE] + struct.pack("<I", inside)


def unshift_acl(value: bytes, idmap: IdMap) -> bytes | None:
    """A POSIX ACL xattr (`system.posix_acl_*`, version 2: a 4-byte header, then 8-byte entries
    tag:u16 perm:u16 id:u32) with the sandbox's host ids of named users and groups made sandbox
    ids. None when there is nothing to change (or the value is not an ACL)."""
    if len(value) < 4 or (len(value) - 4) % 8:
        return None
    out = bytearray(value)
    changed = False
    for offset in range(4, len(value), 8):
        tag, _, qualifier = struct.unpack_from("<HHI", value, offset)
        inside = idmap.from_host(qualifier) if tag in (_ACL_USER, _ACL_GROUP) else None
        if inside is not None:
            struct.pack_into("<I", out, offset + 4, inside)
            changed = True
    return bytes(out) if changed else None


def _id_xattrs(path: str) -> dict[str, bytes]:
    """The xattrs of `path` that hold ids (file capabilities, ACLs)."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    found = {}
    for name in names:
        if name == _FSCAP or name in _ACLS:
            try:
                found[name] = os.getxattr(path, name, follow_symlinks=False)
            except OSError:
                continue
    return found


def _unshift_entry(path: str, st: os.stat_result, idmap: IdMap) -> bool:
    uid, gid = idmap.from_host(st.st_uid), idmap.from_host(st.st_gid)
    if stat.S_ISLNK(st.st_mode):
        if uid is None and gid is None:
            return False
        os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid, follow_symlinks=False)
        return True
    xattrs = _id_xattrs(path)
    rewritten = {}
    for name, value in xattrs.items():
        new = unshift_fscap(value, idmap) if name == _FSCAP else unshift_acl(value, idmap)
        if new is not None:
            rewritten[name] = new
    chowned = uid is not None or gid is not None
    if not chowned and not rewritten:
        return False
    if chowned:  # the kernel drops setuid/setgid bits and file capabilities here: restored below
        os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid, follow_symlinks=False)
    for name in _ACLS:
        if name in rewritten:
            os.setxattr(path, name, rewritten[name], follow_symlinks=False)
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_IMODE(os.lstat(path).st_mode) != mode:
        os.chmod(path, mode)  # not a symlink (checked above); the copy holds still
    fscap = rewritten.get(_FSCAP, xattrs.get(_FSCAP))
    if fscap is not None and (chowned or _FSCAP in rewritten):
        os.setxattr(path, _FSCAP, fscap, follow_symlinks=False)
    return True


def unshift_tree(root: Path, idmap: IdMap) -> int:
    """Shift a copy of a sandbox's writable layer back to sandbox ids, in place: owners base+N
    become N, with modes (setuid/setgid), file capabilities and ACLs kept; times are untouched
    (only ctime changes). Never follows a symlink. Returns how many entries changed.

    Only for a private copy nobody else writes to (`storage.commit` makes one)."""
    changed = 0
    stack = [str(root)]
    while stack:
        path = stack.pop()
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            stack.extend(os.path.join(path, name) for name in os.listdir(path))
        if _unshift_entry(path, st, idmap):
            changed += 1
    return changed

"""Users and groups of a sandbox, read from its own /etc/passwd and /etc/group.

The files are read through the sandbox's `ConfinedRoot` (they are hostile input: a symlink to a
host file stays in the root, a FIFO is refused, size is bounded) and parsed like Go's pure
`os/user` does, which is what envd uses: first matching line wins, malformed lines are skipped.
Parsed files are cached per root and invalidated when either file's inode, size or mtime changes.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import threading
import weakref
from collections.abc import Mapping

from corral.core.errors import FailedPrecondition, InvalidArgument, NotFound, Unauthenticated
from corral.node.envd.confined import ConfinedRoot
from corral.node.runtime.base import UserIds

__all__ = [
    "GROUP_PATH",
    "MAX_DB_BYTES",
    "PASSWD_PATH",
    "GroupEntry",
    "UserDb",
    "load_user_db",
    "lookup_user",
    "owner_names",
    "parse_group",
    "parse_passwd",
]

MAX_DB_BYTES = 1 << 20  # a larger /etc/passwd or /etc/group is refused
PASSWD_PATH = "/etc/passwd"
GROUP_PATH = "/etc/group"


@dataclasses.dataclass(frozen=True, slots=True)
class GroupEntry:
    name: str
    gid: int
    members: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class UserDb:
    """One sandbox's users (by name, first line wins) and groups, as parsed."""

    users: Mapping[str, UserIds]
    groups: tuple[GroupEntry, ...]
    # Users with their groups, as looked up (every command looks its user up; the db is immutable)
    _resolved: dict[str, UserIds] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def user(self, name: str) -> UserIds | None:
        resolved = self._resolved.get(name)
        if resolved is not None:
            return resolved
        found = self.users.get(name)
        if found is None:
            return None
        gids = [found.gid]
        for group in self.groups:
            if name in group.members and group.gid not in gids:
                gids.append(group.gid)
        resolved = self._resolved[name] = dataclasses.replace(found, groups=tuple(gids))
        return resolved

    def uid_names(self) -> dict[int, str]:
        names: dict[int, str] = {}
        for user in self.users.values():
            names.setdefault(user.uid, user.name)
        return names

    def gid_names(self) -> dict[int, str]:
        names: dict[int, str] = {}
        for group in self.groups:
            names.setdefault(group.gid, group.name)
        return names


def _lines(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "+", "-")):  # comments, NIS compat entries
            continue
        rows.append(line.split(":"))
    return rows


def _id(value: str) -> int | None:
    return (
        int(value)
        if value.isascii() and value.isdigit() and len(value) <= 10 and int(value) < 2**32
        else None
    )


def parse_passwd(text: str) -> dict[str, UserIds]:
    """`name:passwd:uid:gid:gecos:home:shell` lines → users by name (first occurrence wins)."""
    users: dict[str, UserIds] = {}
    for fields in _lines(text):
        if len(fields) < 6 or not fields[0]:
            continue
        uid, gid = _id(fields[2]), _id(fields[3])
        if uid is None or gid is None or fields[0] in users:
            continue
        shell = fields[6] if len(fields) > 6 and fields[6] else "/bin/sh"
        users[fields[0]] = UserIds(name=fields[0], uid=uid, gid=gid, home=fields[5] or "/", shell=shell)
    return users


def parse_group(text: str) -> tuple[GroupEntry, ...]:
    """`name:passwd:gid:member,member` lines → groups in file order."""
    groups = []
    for fields in _lines(text):
        if len(fields) < 3 or not fields[0]:
            continue
        gid = _id(fields[2])
        if gid is None:
            continue
        members = tuple(m for m in fields[3].split(",") if m) if len(fields) > 3 else ()
        groups.append(GroupEntry(fields[0], gid, members))
    return tuple(groups)


Stamp = tuple[int, int, int, int] | None


def _stamp_of(st: os.stat_result) -> Stamp:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _stamp(root: ConfinedRoot, path: str) -> Stamp:
    try:
        return _stamp_of(root.stat(path))
    except NotFound:
        return None


def _stamps(root: ConfinedRoot) -> tuple[Stamp, Stamp]:
    """Stamps of /etc/passwd and /etc/group, checked on every lookup: one confined open of /etc
    and an lstat of each name in it (no path walk: a single name under the fd); a name that is a
    symlink is followed the confined way."""
    try:
        etc = root.open_handle("/etc")
    except NotFound:
        return None, None
    except InvalidArgument:  # /etc is not a directory (or not reachable as one)
        return _stamp(root, PASSWD_PATH), _stamp(root, GROUP_PATH)
    try:
        stamps: list[Stamp] = []
        for path in (PASSWD_PATH, GROUP_PATH):
            try:
                st = os.stat(os.path.basename(path), dir_fd=etc, follow_symlinks=False)
            except FileNotFoundError:
                stamps.append(None)
                continue
            except OSError:
                st = None
            stamps.append(
                _stamp_of(st) if st is not None and not stat.S_ISLNK(st.st_mode) else _stamp(root, path)
            )
        return stamps[0], stamps[1]
    finally:
        os.close(etc)


def _read_text(root: ConfinedRoot, path: str) -> str:
    try:
        fd = root.open_regular(path)
    except NotFound:
        return ""
    try:
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_DB_BYTES:
            chunk = os.read(fd, min(65536, MAX_DB_BYTES + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > MAX_DB_BYTES:
        raise FailedPrecondition(f"{path} in the sandbox is larger than {MAX_DB_BYTES} bytes")
    return b"".join(chunks).decode("utf-8", "replace")


_cache: weakref.WeakKeyDictionary[ConfinedRoot, tuple[object, UserDb]] = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def load_user_db(root: ConfinedRoot) -> UserDb:
    """The sandbox's parsed passwd + group files (cached until either file changes)."""
    stamp = _stamps(root)
    with _cache_lock:
        cached = _cache.get(root)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    db = UserDb(parse_passwd(_read_text(root, PASSWD_PATH)), parse_group(_read_text(root, GROUP_PATH)))
    with _cache_lock:
        _cache[root] = (stamp, db)
    return db


def lookup_user(root: ConfinedRoot, name: str) -> UserIds:
    """The sandbox user `name` with its groups (primary first); unknown → Unauthenticated."""
    user = load_user_db(root).user(name)
    if user is None:
        raise Unauthenticated(f"invalid username: '{name}'")
    return user


def owner_names(root: ConfinedRoot) -> tuple[dict[int, str], dict[int, str]]:
    """`(uid → user name, gid → group name)` for entry info; ids missing here show as numbers."""
    db = load_user_db(root)
    return db.uid_names(), db.gid_names()

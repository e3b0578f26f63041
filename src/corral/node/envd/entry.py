"""Filesystem entries as envd describes them, and envd's path and metadata rules.

Pure helpers (`go_mode_string`, `file_kind`, `resolve_user_path`, `validate_metadata`) plus the
readers that build an `Entry` through a `ConfinedRoot`, with envd's semantics (infra
`GetEntryFromPath`, lstat-based):

* `type` and `mode` (permission bits) come from the symlink's *target* when the entry is a
  symlink; a broken symlink has type UNSPECIFIED and mode 0;
* `permissions` is Go's `FileMode.String()` of the lstat mode (`-rw-r--r--`, `Lrwxrwxrwx`);
* `size` and `modified` are the lstat values; owner/group are names from the sandbox's own
  /etc/passwd and /etc/group (numbers when unknown) of the ids as the sandbox sees them (its user
  namespace's, `ConfinedRoot.owner`: host stat ids are shifted);
* `symlink_target` (symlinks only) is the fully resolved absolute sandbox path, or the entry's
  own path when it cannot be resolved (as envd does);
* `metadata` holds the `user.e2b.<key>` xattrs of the (followed) file, prefix stripped.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import posixpath
import stat
from collections.abc import Iterator, Mapping

from corral.core.errors import CorralError, InvalidArgument, NotFound
from corral.node.envd.confined import ConfinedRoot, normalize
from corral.node.envd.users import owner_names

__all__ = [
    "MAX_METADATA_KEY_BYTES",
    "MAX_METADATA_TOTAL_BYTES",
    "METADATA_PREFIX",
    "Entry",
    "FileKind",
    "OwnerNames",
    "file_kind",
    "go_mode_string",
    "list_entries",
    "read_entry",
    "read_metadata",
    "resolve_user_path",
    "validate_metadata",
    "write_metadata",
]

METADATA_PREFIX = "user.e2b."
MAX_METADATA_KEY_BYTES = 255 - len(METADATA_PREFIX)  # the VFS limits a whole xattr name to 255
MAX_METADATA_TOTAL_BYTES = 4096  # names (with prefix) + values; ext4 keeps an inode's xattrs in one block

OwnerNames = tuple[Mapping[int, str], Mapping[int, str]]  # (uid → name, gid → name)


class FileKind(enum.IntEnum):
    """envd's `filesystem.FileType` (same numbers)."""

    UNSPECIFIED = 0
    FILE = 1
    DIRECTORY = 2
    SYMLINK = 3


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    name: str
    type: FileKind
    path: str  # absolute sandbox path
    size: int
    mode: int  # permission bits only
    permissions: str  # Go FileMode.String() of the lstat mode
    owner: str
    group: str
    modified_ns: int  # 0 = unknown
    symlink_target: str | None = None
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)


# Go's FileMode type bits in String() order ("dalTLDpSugct?"), as os.Stat derives them from st_mode.
# a (append), l (exclusive), T (temporary) and ? (irregular) never come from a Unix stat.
def _go_type_letters(st_mode: int) -> str:
    fmt = stat.S_IFMT(st_mode)
    letters = ""
    if fmt == stat.S_IFDIR:
        letters += "d"
    if fmt == stat.S_IFLNK:
        letters += "L"
    if fmt in (stat.S_IFBLK, stat.S_IFCHR):
        letters += "D"
    if fmt == stat.S_IFIFO:
        letters += "p"
    if fmt == stat.S_IFSOCK:
        letters += "S"
    if st_mode & stat.S_ISUID:
        letters += "u"
    if st_mode & stat.S_ISGID:
        letters += "g"
    if fmt == stat.S_IFCHR:
        letters += "c"
    if st_mode & stat.S_ISVTX:
        letters += "t"
    return letters


def go_mode_string(st_mode: int) -> str:
    """Go's `os.FileMode.String()` for a Unix `st_mode`: `-rw-r--r--`, `drwxr-xr-x`, `Lrwxrwxrwx`."""
    perms = "".join(ch if st_mode & (1 << (8 - i)) else "-" for i, ch in enumerate("rwxrwxrwx"))
    return (_go_type_letters(st_mode) or "-") + perms


def file_kind(st_mode: int) -> FileKind:
    if stat.S_ISREG(st_mode):
        return FileKind.FILE
    if stat.S_ISDIR(st_mode):
        return FileKind.DIRECTORY
    if stat.S_ISLNK(st_mode):
        return FileKind.SYMLINK
    return FileKind.UNSPECIFIED


def resolve_user_path(path: str, home: str, workdir: str | None = None) -> str:
    """envd's `ExpandAndResolve`: "" → `workdir` (or home), `~`/`~/x` → under home,
    relative → under home; then cleaned into an absolute path. `~user` is refused."""
    if not path and workdir:
        path = workdir
    if path.startswith("~"):
        if len(path) > 1 and path[1] not in "/\\":
            raise InvalidArgument(f"failed to expand path '{path}': cannot expand user-specific home dir")
        path = home + "/" + path[1:]
    if not path.startswith("/"):
        path = home + "/" + path
    return normalize(path)


def validate_metadata(metadata: Mapping[str, str]) -> None:
    """Keys and values printable ASCII, keys non-empty and ≤ 246 bytes, everything ≤ 4096 bytes."""
    total = 0
    for key, value in metadata.items():
        if not key:
            raise InvalidArgument("metadata key must not be empty")
        if len(key) > MAX_METADATA_KEY_BYTES:
            raise InvalidArgument(f"metadata key {key!r} exceeds {MAX_METADATA_KEY_BYTES} bytes")
        for label, text in (("key", key), (f"value for key {key!r}", value)):
            for offset, ch in enumerate(text):
                if not " " <= ch <= "~":
                    raise InvalidArgument(
                        f"metadata {label} contains non-printable-ASCII byte 0x{ord(ch):02x} at offset {offset}"
                    )
        total += len(METADATA_PREFIX) + len(key) + len(value)
    if total > MAX_METADATA_TOTAL_BYTES:
        raise InvalidArgument(f"total metadata size {total} exceeds {MAX_METADATA_TOTAL_BYTES} bytes")


def read_metadata(fd: int) -> dict[str, str]:
    """`user.e2b.*` xattrs of the inode behind `fd`, prefix stripped; non-UTF-8 ones skipped."""
    metadata: dict[str, str] = {}
    for name in ConfinedRoot.listxattr(fd):
        if not name.startswith(METADATA_PREFIX):
            continue
        try:
            value = ConfinedRoot.getxattr(fd, name).decode("utf-8")
            key = name[len(METADATA_PREFIX) :]
            key.encode("utf-8")  # a surrogate-escaped (non-UTF-8) name raises here
        except (OSError, UnicodeError):
            continue
        metadata[key] = value
    return metadata


def write_metadata(fd: int, metadata: Mapping[str, str]) -> None:
    """Replace the file's `user.e2b.*` xattrs with `metadata` (empty ⇒ all removed).

    Nothing is touched when there is nothing to remove or set, so a plain upload causes no
    extra inotify ATTRIB event.
    """
    validate_metadata(metadata)
    for name in ConfinedRoot.listxattr(fd):
        if name.startswith(METADATA_PREFIX) and name[len(METADATA_PREFIX) :] not in metadata:
            try:
                ConfinedRoot.removexattr(fd, name)
            except OSError:
                pass  # removed concurrently
    for key, value in metadata.items():
        ConfinedRoot.setxattr(fd, METADATA_PREFIX + key, value.encode("ascii"))


def _name_of(norm: str) -> str:
    return posixpath.basename(norm) or "/"


def read_entry(root: ConfinedRoot, path: str, names: OwnerNames | None = None) -> Entry:
    """The entry at `path` (not following a final symlink for name/size/permissions)."""
    norm = normalize(path)
    lst = root.lstat(norm)
    kind = file_kind(lst.st_mode)
    mode = stat.S_IMODE(lst.st_mode) & 0o777
    target: str | None = None
    followed = norm
    if kind is FileKind.SYMLINK:
        kind, mode = FileKind.UNSPECIFIED, 0
        try:
            target = root.realpath(norm)
            tst = root.stat(target)
        except CorralError:
            target = target or norm
        else:
            kind, mode, followed = file_kind(tst.st_mode), stat.S_IMODE(tst.st_mode) & 0o777, target
    uids, gids = names if names is not None else owner_names(root)
    uid, gid = root.owner(lst)
    metadata: dict[str, str] = {}
    if kind in (FileKind.FILE, FileKind.DIRECTORY):
        metadata = _metadata_at(root, followed)
    return Entry(
        name=_name_of(norm),
        type=kind,
        path=norm,
        size=lst.st_size,
        mode=mode,
        permissions=go_mode_string(lst.st_mode),
        owner=uids.get(uid, str(uid)),
        group=gids.get(gid, str(gid)),
        modified_ns=lst.st_mtime_ns,
        symlink_target=target,
        metadata=metadata,
    )


def _metadata_at(root: ConfinedRoot, path: str) -> dict[str, str]:
    try:
        fd = root.open_handle(path)
    except CorralError:
        return {}
    try:
        return read_metadata(fd)
    except OSError:
        return {}
    finally:
        os.close(fd)


def list_entries(root: ConfinedRoot, path: str, depth: int, names: OwnerNames | None = None) -> list[Entry]:
    """envd ListDir: the directory at `path` (symlinks followed) walked like Go's WalkDir.

    Pre-order, names sorted bytewise, `depth` levels below the directory (0 counts as 1),
    symlinked directories listed but not descended into. Entry paths are under the directory's
    resolved path. A missing path raises NotFound; a non-directory, InvalidArgument.
    """
    norm = normalize(path)
    resolved = root.realpath(norm)
    if not stat.S_ISDIR(root.stat(resolved).st_mode):
        raise InvalidArgument(f"path is not a directory: {norm}")
    depth = max(depth, 1)
    names = names if names is not None else owner_names(root)
    entries: list[Entry] = []
    top = root.open_dir(resolved)
    stack: list[tuple[int, str, int, Iterator[str]]] = [(top, resolved, 1, _sorted_names(top))]
    try:
        while stack:
            dir_fd, dir_path, level, children = stack[-1]
            name = next(children, None)
            if name is None:
                stack.pop()
                os.close(dir_fd)
                continue
            child_path = posixpath.join(dir_path, name)
            try:
                entry = read_entry(root, child_path, names)
            except NotFound:
                continue  # removed while we walk
            entries.append(entry)
            if level < depth and entry.type is FileKind.DIRECTORY and entry.symlink_target is None:
                try:
                    child_fd = root.open_child_dir(dir_fd, name)
                except OSError:
                    continue  # removed or swapped for a symlink meanwhile: not descended into
                stack.append((child_fd, child_path, level + 1, _sorted_names(child_fd)))
    finally:
        for dir_fd, *_ in stack:
            os.close(dir_fd)
    return entries


def _sorted_names(dir_fd: int) -> Iterator[str]:
    return iter(sorted(os.listdir(dir_fd), key=os.fsencode))

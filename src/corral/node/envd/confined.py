"""Confined file access inside one sandbox's root directory.

envd runs in the host server process (as root) and serves many sandboxes, while each sandbox's file
tree is hostile: absolute symlinks, `..`, `/proc/self/root`, directories swapped for symlinks while
we work. Everything here therefore resolves paths with openat2(2) relative to the sandbox's root
directory fd with `RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS`: the kernel treats that fd as `/` for
every component and every symlink (so `..` and absolute links stay inside) and refuses procfs magic
links (`/proc/<pid>/root` of a sandbox's procfs, or `/proc/self/...`, which would name *our* root).
Mount points inside the sandbox (its /proc, /tmp, volumes) may be crossed: they are the sandbox's.

Rules the code below follows (TOCTOU):
* A path string is resolved exactly once, by openat2 from the root fd. Later steps act on the fd
  (`fstat`, `fchown`, `*at(dir_fd=...)`) and never re-resolve a host path.
* Single names under a directory fd are opened with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`: a
  directory swapped for a symlink is refused instead of followed.
* File data is only opened after `fstat` of an `O_PATH` fd proved it a regular file (a FIFO would
  block us, a device node created by a sandbox's root would be opened with the host's rights); the
  O_PATH fd is then re-opened through `/proc/self/fd/N`, which names exactly that inode.
* Error messages name the sandbox path, never a host path.

Ids given to and returned by `ConfinedRoot` are sandbox ids. A sandbox in a user namespace
(`corral.node.runtime.idmap`) keeps its files under shifted host ids: the root's `IdMap` turns
the ids it chowns to into host ids (`to_host`) and `owner` turns a host `stat`'s owner back into
the sandbox's view (`as_seen_inside`: an unmapped host id shows as 65534, as inside). Without an
`IdMap` host and sandbox ids are the same.

Paths given to `ConfinedRoot` are sandbox paths; they are cleaned lexically first (like Go's
`filepath.Clean`, which is what envd does) and a relative path is taken relative to `/`.

Errors (all `CorralError`, see `error_from_oserror`): ENOENT→NotFound, EEXIST→AlreadyExists,
ENOTDIR/EISDIR/EINVAL/ELOOP/ENAMETOOLONG/EXDEV→InvalidArgument, EACCES/EPERM/EROFS→PermissionDenied,
ENOSPC/EDQUOT→DiskFull (a ResourceExhausted; `/files` answers 507), ENOTEMPTY/EBUSY→FailedPrecondition,
anything else→Internal.
"""

from __future__ import annotations

import ctypes
import errno
import os
import posixpath
import stat
import threading
from typing import Any, Self

from corral.core.errors import (
    AlreadyExists,
    CorralError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from corral.node.runtime.idmap import IdMap

__all__ = [
    "MAX_PATH",
    "MAX_SYMLINKS",
    "RESOLVE_BENEATH",
    "RESOLVE_IN_ROOT",
    "RESOLVE_NO_MAGICLINKS",
    "RESOLVE_NO_SYMLINKS",
    "ConfinedRoot",
    "DiskFull",
    "error_from_oserror",
    "normalize",
    "openat2",
]

MAX_PATH = 4096  # PATH_MAX, in bytes
MAX_SYMLINKS = 40  # the kernel's limit per resolution (MAXSYMLINKS)

SYS_OPENAT2 = 437  # same number on every architecture (syscall table unification)
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

_IN_ROOT = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS  # a sandbox path, relative to the root fd
_ONE_NAME = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS  # one name under a dir fd
_O_PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC  # all openat2 allows with O_PATH
_RETRIES = 8  # openat2 answers EAGAIN when a concurrent rename/mount races a `..` walk


class DiskFull(ResourceExhausted):
    """ENOSPC/EDQUOT: the sandbox's disk or inodes ran out (`/files` answers HTTP 507)."""


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def openat2(dirfd: int, path: bytes, flags: int, mode: int = 0, resolve: int = 0) -> int:
    """openat2(2). Adds O_CLOEXEC; `mode` only counts with O_CREAT. Raises OSError."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0, resolve)
    for _ in range(_RETRIES):
        fd = _syscall(
            ctypes.c_long(SYS_OPENAT2),
            ctypes.c_long(dirfd),
            ctypes.c_char_p(path),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err not in (errno.EAGAIN, errno.EINTR):
            raise OSError(err, os.strerror(err))
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))


def normalize(path: str) -> str:
    """Validate a sandbox path and clean it lexically into an absolute path (Go `filepath.Clean`)."""
    if not isinstance(path, str):
        raise InvalidArgument("path must be a string")
    if "\x00" in path:
        raise InvalidArgument("path contains a NUL byte")
    try:
        size = len(os.fsencode(path))
    except UnicodeEncodeError:
        raise InvalidArgument("path is not valid UTF-8") from None
    if size > MAX_PATH:
        raise InvalidArgument(f"path is longer than {MAX_PATH} bytes")
    cleaned = posixpath.normpath("/" + path)
    return "/" + cleaned.lstrip("/")  # normpath keeps a leading "//"


def _relative(norm: str) -> bytes:
    return os.fsencode(norm[1:]) if norm != "/" else b"."


def error_from_oserror(exc: OSError, path: str) -> CorralError:
    """One table from errno to our errors; messages name the sandbox path only."""
    code = exc.errno
    if code == errno.ENOENT:
        return NotFound(f"path '{path}' does not exist")
    if code == errno.EEXIST:
        return AlreadyExists(f"path '{path}' already exists")
    if code == errno.ENOTDIR:
        return InvalidArgument(f"path '{path}': a component of the path is not a directory")
    if code == errno.EISDIR:
        return InvalidArgument(f"path '{path}' is a directory")
    if code == errno.ELOOP:
        return InvalidArgument(f"path '{path}': too many levels of symbolic links")
    if code == errno.ENAMETOOLONG:
        return InvalidArgument(f"path '{path}': file name too long")
    if code == errno.EXDEV:
        return InvalidArgument(f"path '{path}': cannot move across file systems")
    if code == errno.EINVAL:
        return InvalidArgument(f"path '{path}': invalid argument")
    if code in (errno.EACCES, errno.EPERM):
        return PermissionDenied(f"path '{path}': permission denied")
    if code == errno.EROFS:
        return PermissionDenied(f"path '{path}': read-only file system")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull("not enough disk space available")
    if code == errno.ENOTEMPTY:
        return FailedPrecondition(f"path '{path}': directory not empty")
    if code == errno.EBUSY:
        return FailedPrecondition(f"path '{path}': device or resource busy")
    reason = os.strerror(code) if code else "unknown error"
    return Internal(f"path '{path}': {reason.lower()}")


def _fd_path(fd: int) -> str:
    # The magic link of our own fd: resolves to exactly the inode the fd holds.
    return f"/proc/self/fd/{fd}"


class ConfinedRoot:
    """Confined access to one sandbox's file tree through its root directory fd.

    `fd` is an O_PATH (or ordinary) directory fd; by default the caller keeps owning it. All
    methods take sandbox paths and raise `CorralError`s. Methods returning an fd hand over
    ownership (close it). Thread-safe. Give it the fd to own (`owns_fd=True`) and `close()` the
    root rather than the fd, so that no in-flight call can see the fd number reused.
    """

    def __init__(self, fd: int, *, owns_fd: bool = False, id_map: IdMap | None = None) -> None:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise InvalidArgument("the sandbox root is not a directory")
        self.id_map = id_map  # the sandbox's user namespace; None: sandbox ids are host ids
        self._fd = fd
        self._owns_fd = owns_fd
        self._lock = threading.Lock()
        self._busy = 0  # syscalls on the root fd in flight (worker threads)
        self._closed = False

    @classmethod
    def open_path(cls, host_path: str, *, id_map: IdMap | None = None) -> ConfinedRoot:
        """Open a host directory as a root (tests, tools). The new root owns its fd."""
        fd = os.open(host_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return cls(fd, owns_fd=True, id_map=id_map)

    # -- ids -----------------------------------------------------------------------------------

    def host_id(self, sandbox_id: int) -> int:
        """The host id that stands for sandbox id `sandbox_id` on disk (-1, "leave unchanged",
        stays -1). An id the sandbox's user namespace does not map is refused (InvalidArgument)."""
        if self.id_map is None or sandbox_id == -1:
            return sandbox_id
        try:
            return self.id_map.to_host(sandbox_id)
        except ValueError:
            raise InvalidArgument(f"id {sandbox_id} is not mapped in the sandbox") from None

    def owner(self, st: os.stat_result) -> tuple[int, int]:
        """`(uid, gid)` of a host `stat` of a file in this root, as the sandbox sees them."""
        if self.id_map is None:
            return st.st_uid, st.st_gid
        return self.id_map.as_seen_inside(st.st_uid), self.id_map.as_seen_inside(st.st_gid)

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        """Refuse new operations (Unavailable) and close an owned fd once no syscall uses it.

        Closing is deferred while a worker thread is inside a syscall on the root fd: closing
        it then could let the number be reused by another sandbox's root mid-call.
        """
        with self._lock:
            self._closed = True
            if self._busy == 0:
                self._release_fd()

    def _release_fd(self) -> None:
        if self._owns_fd and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1

    def _openat_root(self, norm: str, flags: int, mode: int) -> int:
        with self._lock:
            if self._closed:
                raise Unavailable("the sandbox's file system is no longer available")
            self._busy += 1
        try:
            return openat2(self._fd, _relative(norm), flags, mode, _IN_ROOT)
        finally:
            with self._lock:
                self._busy -= 1
                if self._closed and self._busy == 0:
                    self._release_fd()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- opening -------------------------------------------------------------------------------

    def _open(self, norm: str, flags: int, mode: int = 0o666) -> int:
        if not flags & os.O_PATH:
            flags |= os.O_NOCTTY
        elif flags & ~_O_PATH_FLAGS:
            raise ValueError("O_PATH only combines with O_DIRECTORY and O_NOFOLLOW")
        try:
            return self._openat_root(norm, flags, mode)
        except OSError as exc:
            raise error_from_oserror(exc, norm) from None

    def open(self, path: str, flags: int, mode: int = 0o666) -> int:
        """openat2 of a sandbox path with any flags. Prefer `open_regular`/`open_for_write` for
        file data: this one would open a FIFO or a device node as well."""
        return self._open(normalize(path), flags, mode)

    def open_handle(self, path: str, *, follow: bool = True) -> int:
        """An O_PATH fd (for fstat, `*at` calls, xattrs). `follow=False`: the symlink itself."""
        return self._open(normalize(path), os.O_PATH | (0 if follow else os.O_NOFOLLOW))

    def open_dir(self, path: str) -> int:
        """A readable directory fd (for listing, `fchown`)."""
        return self._open(normalize(path), os.O_RDONLY | os.O_DIRECTORY)

    def open_regular(self, path: str, flags: int = os.O_RDONLY) -> int:
        """Open a regular file's data; anything else (dir, FIFO, device, socket) is refused."""
        norm = normalize(path)
        pfd = self._open(norm, os.O_PATH)
        try:
            _require_regular(os.fstat(pfd), norm)
            return _reopen(pfd, flags & ~os.O_CREAT, norm)
        finally:
            os.close(pfd)

    def open_for_write(self, path: str, *, uid: int, gid: int, mode: int = 0o644) -> tuple[int, bool]:
        """Open a regular file for writing from its start, truncated, owned by uid:gid.

        Returns `(fd, created)`. The parent directory must exist. The syscall order is what
        inotify watchers of the E2B SDK expect: a new file yields CREATE, ATTRIB (chown), then
        the caller's writes MODIFY; an existing file keeps its mode and yields ATTRIB, MODIFY.
        """
        norm = normalize(path)
        uid, gid = self.host_id(uid), self.host_id(gid)
        for _ in range(_RETRIES):
            try:
                pfd = self._open(norm, os.O_PATH)
            except NotFound:
                try:
                    fd = self._open(norm, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
                except AlreadyExists:
                    continue  # raced with another writer, or a dangling symlink: look again
                return self._own_new_file(fd, norm, uid, gid, mode), True
            try:
                _require_regular(os.fstat(pfd), norm)
                fd = _reopen(pfd, os.O_WRONLY, norm)
            finally:
                os.close(pfd)
            try:
                os.fchown(fd, uid, gid)
                os.ftruncate(fd, 0)
            except OSError as exc:
                os.close(fd)
                raise error_from_oserror(exc, norm) from None
            return fd, False
        # Still missing yet "existing": the name is a dangling symlink. O_CREAT follows it (in
        # the root); O_NONBLOCK + fstat keep a FIFO raced into place from blocking us.
        fd = self._open(norm, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK, mode)
        try:
            _require_regular(os.fstat(fd), norm)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return self._own_new_file(fd, norm, uid, gid, mode), True

    @staticmethod
    def _own_new_file(fd: int, norm: str, uid: int, gid: int, mode: int) -> int:
        try:
            if stat.S_IMODE(os.fstat(fd).st_mode) != mode:  # umask took bits away
                os.fchmod(fd, mode)
            os.fchown(fd, uid, gid)
        except OSError as exc:
            os.close(fd)
            raise error_from_oserror(exc, norm) from None
        return fd

    # -- metadata ------------------------------------------------------------------------------

    def lstat(self, path: str) -> os.stat_result:
        """stat of the entry itself (a symlink is not followed)."""
        return self._fstat_of(normalize(path), os.O_PATH | os.O_NOFOLLOW)

    def stat(self, path: str) -> os.stat_result:
        """stat following symlinks, confined to the root."""
        return self._fstat_of(normalize(path), os.O_PATH)

    def _fstat_of(self, norm: str, flags: int) -> os.stat_result:
        fd = self._open(norm, flags)
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def exists(self, path: str) -> bool:
        try:
            self.lstat(path)
        except NotFound:
            return False
        return True

    def readlink(self, path: str) -> str:
        """The raw target text of a symlink (a sandbox path, possibly relative)."""
        norm = normalize(path)
        parent, name = posixpath.split(norm)
        if not name:
            raise InvalidArgument("path '/' is not a symbolic link")
        pfd = self._open(parent, os.O_PATH | os.O_DIRECTORY)
        try:
            return os.readlink(name, dir_fd=pfd)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise InvalidArgument(f"path '{norm}' is not a symbolic link") from None
            raise error_from_oserror(exc, norm) from None
        finally:
            os.close(pfd)

    def realpath(self, path: str) -> str:
        """Resolve every symlink within the root; the absolute sandbox path of the target.

        Walks the components itself (each step an lstat/readlink through the root), so the
        result is a sandbox path by construction. Missing components raise NotFound, a loop
        raises InvalidArgument.
        """
        norm = normalize(path)
        pending = [part for part in reversed(norm.split("/")) if part]
        resolved: list[str] = []
        links = 0
        while pending:
            part = pending.pop()
            if part == ".":
                continue
            if part == "..":
                if resolved:
                    resolved.pop()
                continue
            candidate = "/" + "/".join([*resolved, part])
            if not stat.S_ISLNK(self.lstat(candidate).st_mode):
                resolved.append(part)
                continue
            links += 1
            if links > MAX_SYMLINKS:
                raise InvalidArgument(f"path '{norm}': too many levels of symbolic links")
            target = self.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            pending.extend(p for p in reversed(target.split("/")) if p)
        return "/" + "/".join(resolved)

    # -- directories ---------------------------------------------------------------------------

    def listdir(self, path: str) -> list[str]:
        """Names in a directory (symlinks followed in the root), sorted bytewise like Go."""
        fd = self.open_dir(path)
        try:
            return sorted(os.listdir(fd), key=os.fsencode)
        finally:
            os.close(fd)

    @staticmethod
    def open_child_dir(dir_fd: int, name: str) -> int:
        """Open the directory `name` directly under `dir_fd`, refusing a symlink (OSError)."""
        return openat2(dir_fd, os.fsencode(name), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, 0, _ONE_NAME)

    def mkdir(self, path: str, mode: int = 0o755, *, uid: int | None = None, gid: int | None = None) -> None:
        """Create one directory (parent must exist), with exactly `mode`, optionally chowned."""
        norm = normalize(path)
        uid, gid = self._host_ids(uid, gid)
        parent, name = posixpath.split(norm)
        if not name:
            raise AlreadyExists("path '/' already exists")
        pfd = self._open(parent, os.O_PATH | os.O_DIRECTORY)
        try:
            self._mkdir_at(pfd, name, norm, mode, uid, gid)
        finally:
            os.close(pfd)

    def _host_ids(self, uid: int | None, gid: int | None) -> tuple[int | None, int | None]:
        return (None if uid is None else self.host_id(uid)), (None if gid is None else self.host_id(gid))

    def _mkdir_at(self, pfd: int, name: str, norm: str, mode: int, uid: int | None, gid: int | None) -> None:
        # uid/gid: host ids (mapped by the caller)
        try:
            os.mkdir(name, mode, dir_fd=pfd)
            dfd = self.open_child_dir(pfd, name)
        except OSError as exc:
            raise error_from_oserror(exc, norm) from None
        try:
            if stat.S_IMODE(os.fstat(dfd).st_mode) != mode:  # umask took bits away
                os.fchmod(dfd, mode)
            if uid is not None or gid is not None:
                os.fchown(dfd, -1 if uid is None else uid, -1 if gid is None else gid)
        except OSError as exc:
            raise error_from_oserror(exc, norm) from None
        finally:
            os.close(dfd)

    def makedirs(
        self, path: str, mode: int = 0o755, *, uid: int | None = None, gid: int | None = None
    ) -> list[str]:
        """Create every missing directory of `path` (each `mode`, chowned); returns those created.

        An existing component that is not a directory raises InvalidArgument; existing
        directories (or symlinks to directories, followed in the root) are left alone.
        """
        norm = normalize(path)
        uid, gid = self._host_ids(uid, gid)
        created: list[str] = []
        parts = [p for p in norm.split("/") if p]
        for i in range(1, len(parts) + 1):
            prefix = "/" + "/".join(parts[:i])
            try:
                os.close(self._openat_root(prefix, os.O_PATH | os.O_DIRECTORY, 0))
                continue
            except OSError as exc:
                if exc.errno == errno.ENOTDIR:
                    raise InvalidArgument(f"path '{prefix}' exists but is not a directory") from None
                if exc.errno != errno.ENOENT:
                    raise error_from_oserror(exc, prefix) from None
            parent = "/" + "/".join(parts[: i - 1])
            pfd = self._open(parent, os.O_PATH | os.O_DIRECTORY)
            try:
                self._mkdir_at(pfd, parts[i - 1], prefix, mode, uid, gid)
            except AlreadyExists:
                pass  # created concurrently; the next component's open checks it is a directory
            else:
                created.append(prefix)
            finally:
                os.close(pfd)
        return created

    # -- changing the tree ---------------------------------------------------------------------

    def rename(self, src: str, dst: str) -> None:
        """rename(2) between two sandbox paths; the final names are not followed."""
        src_norm, dst_norm = normalize(src), normalize(dst)
        src_parent, src_name = posixpath.split(src_norm)
        dst_parent, dst_name = posixpath.split(dst_norm)
        if not src_name or not dst_name:
            raise InvalidArgument("cannot move the root directory")
        src_fd = self._open(src_parent, os.O_PATH | os.O_DIRECTORY)
        try:
            dst_fd = self._open(dst_parent, os.O_PATH | os.O_DIRECTORY)
            try:
                os.rename(src_name, dst_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
            except OSError as exc:
                named = src_norm if exc.errno == errno.ENOENT else dst_norm
                raise error_from_oserror(exc, named) from None
            finally:
                os.close(dst_fd)
        finally:
            os.close(src_fd)

    def remove(self, path: str, *, missing_ok: bool = False) -> None:
        """Remove a file, a symlink (not its target) or a whole directory tree, by fds."""
        norm = normalize(path)
        parent, name = posixpath.split(norm)
        if not name:
            raise InvalidArgument("cannot remove the root directory")
        try:
            pfd = self._open(parent, os.O_PATH | os.O_DIRECTORY)
        except NotFound:
            if missing_ok:
                return
            raise
        try:
            try:
                is_dir = stat.S_ISDIR(os.stat(name, dir_fd=pfd, follow_symlinks=False).st_mode)
                if is_dir:
                    _remove_tree(pfd, name)
                else:
                    os.unlink(name, dir_fd=pfd)
            except FileNotFoundError:
                if not missing_ok:
                    raise NotFound(f"path '{norm}' does not exist") from None
            except OSError as exc:
                raise error_from_oserror(exc, norm) from None
        finally:
            os.close(pfd)

    # -- ownership and extended attributes (on fds) --------------------------------------------

    def chown(self, fd: int, uid: int, gid: int) -> None:
        """fchown(2) of an fd opened for reading or writing (not O_PATH), to sandbox ids."""
        os.fchown(fd, self.host_id(uid), self.host_id(gid))

    @staticmethod
    def listxattr(fd: int) -> list[str]:
        """xattr names of the inode behind `fd` (O_PATH fds work too); [] if unsupported."""
        if _is_symlink_fd(fd):
            return []
        try:
            return os.listxattr(_fd_path(fd))
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return []
            raise

    @staticmethod
    def getxattr(fd: int, name: str) -> bytes:
        _refuse_symlink_fd(fd)
        return os.getxattr(_fd_path(fd), name)

    @staticmethod
    def setxattr(fd: int, name: str, value: bytes) -> None:
        _refuse_symlink_fd(fd)
        os.setxattr(_fd_path(fd), name, value)

    @staticmethod
    def removexattr(fd: int, name: str) -> None:
        _refuse_symlink_fd(fd)
        os.removexattr(_fd_path(fd), name)


def _require_regular(st: os.stat_result, norm: str) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise InvalidArgument(f"path '{norm}' is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgument(f"path '{norm}' is not a regular file")


def _reopen(pfd: int, flags: int, norm: str) -> int:
    try:
        return os.open(_fd_path(pfd), flags | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise error_from_oserror(exc, norm) from None


def _is_symlink_fd(fd: int) -> bool:
    return stat.S_ISLNK(os.fstat(fd).st_mode)


def _refuse_symlink_fd(fd: int) -> None:
    # Through /proc/self/fd a symlink's *text* could be resolved against the host's root.
    if _is_symlink_fd(fd):
        raise OSError(errno.ELOOP, "refusing extended attributes on a symbolic link")


def _remove_tree(parent_fd: int, name: str) -> None:
    """rm -rf of the directory `name` under `parent_fd`, iteratively, never following a symlink.

    Each level is an fd opened with RESOLVE_NO_SYMLINKS under its parent's fd; a directory the
    sandbox swaps for a symlink meanwhile is unlinked as a symlink, not descended into.
    """
    top = ConfinedRoot.open_child_dir(parent_fd, name)
    # (dir fd, its entries, parent fd, name in parent, rescans left)
    stack: list[tuple[int, Any, int, str, int]] = [(top, os.scandir(top), parent_fd, name, 3)]
    try:
        while stack:
            dfd, entries, pfd, dname, rescans = stack[-1]
            entry = next(entries, None)
            if entry is None:
                entries.close()
                try:
                    os.rmdir(dname, dir_fd=pfd)
                except OSError as exc:
                    if exc.errno != errno.ENOTEMPTY or rescans == 0:
                        raise
                    stack[-1] = (dfd, os.scandir(dfd), pfd, dname, rescans - 1)  # filled meanwhile
                    continue
                stack.pop()
                os.close(dfd)
                continue
            if entry.is_dir(follow_symlinks=False):
                try:
                    child = ConfinedRoot.open_child_dir(dfd, entry.name)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    _unlink_quiet(entry.name, dfd)  # swapped for a symlink or file meanwhile
                    continue
                stack.append((child, os.scandir(child), dfd, entry.name, 3))
            else:
                try:
                    os.unlink(entry.name, dir_fd=dfd)
                except FileNotFoundError:
                    pass
                except IsADirectoryError:
                    pass  # swapped for a directory meanwhile: the ENOTEMPTY rescan descends into it
    finally:
        for dfd, entries, _, _, _ in stack:
            entries.close()
            os.close(dfd)


def _unlink_quiet(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass

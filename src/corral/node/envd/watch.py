"""Directory watches inside a sandbox for envd's `WatchDir` stream and the polling watcher trio.

    InotifyHub        one per node: one inotify instance and one reader thread; thread-safe
      wd → {_WatchedDir}   a kernel watch (one inode) may serve several watchers
    WatcherRegistry   one per sandbox (`EnvdSandbox.watchers`): id → Watcher, and the limits
      Watcher         one WatchDir stream or one CreateWatcher id: its watched directories and
                      its bounded queue of `WatchEvent`s

Confinement: a watched directory is opened through the sandbox's `ConfinedRoot` (openat2 with
RESOLVE_IN_ROOT; sub-directories with O_NOFOLLOW, so a recursive watch never follows a symlink)
and the kernel watch is added on `/proc/self/fd/<fd>`, which names exactly that inode, never a
host path string. Event names come from the kernel as single names under a watched inode and are
joined to the watcher's own record of where that inode sits, so they are always relative sandbox
names.

Semantics follow envd (github.com/e2b-dev/fsnotify on inotify): IN_CREATE/IN_MOVED_TO → CREATE,
IN_MOVE_SELF/IN_MOVED_FROM → RENAME, IN_ATTRIB → CHMOD, IN_MODIFY → WRITE,
IN_DELETE/IN_DELETE_SELF → REMOVE, one event per kind and in that order; names relative to the
watched directory (`.` for the directory itself, `nested/file` below it). A recursive watch adds
every sub-directory, and for a directory that appears later it walks what is already inside and
reports each entry as CREATE (like `mkdir -p a/b/c`, which is over before a watch on `a` exists).

Immediacy: the kernel queues events synchronously with the file operation, so `sync()` (read the
inotify queue now, in the caller's thread) makes everything that happened before it visible: the
polling RPC calls it before draining, and uploads call it before creating a file so that a
directory just created by MakeDir is already watched.

Bounds per sandbox: `MAX_WATCHERS` watchers, `MAX_WATCHED_DIRS` watched directories and
`MAX_QUEUED_EVENTS` undelivered events; a watcher that would exceed the event bound stops with a
ResourceExhausted error naming the limit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import dataclasses
import enum
import errno
import logging
import os
import posixpath
import secrets
import select
import stat
import struct
import threading
from collections.abc import Iterator

from corral.core.errors import (
    CorralError,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from corral.node.envd.confined import ConfinedRoot, normalize

__all__ = [
    "MAX_DIR_ENTRIES",
    "MAX_QUEUED_EVENTS",
    "MAX_WATCHED_DIRS",
    "MAX_WATCHERS",
    "WATCH_MASK",
    "EventKind",
    "InotifyHub",
    "RawEvent",
    "WatchEvent",
    "Watcher",
    "WatcherRegistry",
    "event_kinds",
    "parse_events",
]

log = logging.getLogger(__name__)

MAX_WATCHERS = 64  # per sandbox (streams + polling watchers)
MAX_WATCHED_DIRS = 8192  # per sandbox, over all its watchers (each is one kernel watch)
MAX_QUEUED_EVENTS = 10_000  # per sandbox: events waiting to be read, over all its watchers
MAX_DIR_ENTRIES = 100_000  # a recursive watch refuses a directory with more entries than this

# inotify(7)
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000

WATCH_MASK = (
    IN_CREATE
    | IN_MODIFY
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVED_TO
    | IN_MOVED_FROM
    | IN_MOVE_SELF
    | IN_ATTRIB
)

_EVENT_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (name follows)
_READ_SIZE = 64 * 1024

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]


class EventKind(enum.IntEnum):
    """envd's `filesystem.EventType` (same numbers)."""

    CREATE = 1
    WRITE = 2
    REMOVE = 3
    RENAME = 4
    CHMOD = 5


@dataclasses.dataclass(frozen=True, slots=True)
class RawEvent:
    wd: int
    mask: int
    cookie: int
    name: bytes  # b"" for an event on the watched inode itself


@dataclasses.dataclass(frozen=True, slots=True)
class WatchEvent:
    name: str  # relative to the watched directory ("." = the directory itself)
    kind: EventKind


def parse_events(buf: bytes) -> list[RawEvent]:
    """Split what read(2) returned from an inotify fd into events (names without NUL padding)."""
    events = []
    offset = 0
    while offset + _EVENT_HEADER.size <= len(buf):
        wd, mask, cookie, length = _EVENT_HEADER.unpack_from(buf, offset)
        start = offset + _EVENT_HEADER.size
        name = bytes(buf[start : start + length]).split(b"\0", 1)[0]
        events.append(RawEvent(wd, mask, cookie, name))
        offset = start + length
    return events


def event_kinds(mask: int) -> tuple[EventKind, ...]:
    """The envd event kinds of one inotify mask, in envd's order."""
    kinds = []
    if mask & (IN_CREATE | IN_MOVED_TO):
        kinds.append(EventKind.CREATE)
    if mask & (IN_MOVE_SELF | IN_MOVED_FROM):
        kinds.append(EventKind.RENAME)
    if mask & IN_ATTRIB:
        kinds.append(EventKind.CHMOD)
    if mask & IN_MODIFY:
        kinds.append(EventKind.WRITE)
    if mask & (IN_DELETE | IN_DELETE_SELF):
        kinds.append(EventKind.REMOVE)
    return tuple(kinds)


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


@dataclasses.dataclass(eq=False, slots=True)
class _WatchedDir:
    watcher: Watcher
    rel: str  # where the watcher saw this directory, relative to its root ("" = the root)
    wd: int


class InotifyHub:
    """The node's inotify instance. `add`/`discard` kernel watches on behalf of watchers; a
    reader thread (started with the first watch) dispatches events; `sync()` dispatches what is
    queued right now. One lock (`lock`, reentrant) covers the fd and every watcher's directories."""

    def __init__(self) -> None:
        fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise Unavailable(f"cannot watch directories: inotify_init1: {os.strerror(err)}")
        self._fd: int = fd
        self.lock = threading.RLock()
        self._dirs: dict[int, set[_WatchedDir]] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread: threading.Thread | None = None
        self._closed = False

    def add(self, dir_fd: int, watcher: Watcher, rel: str) -> _WatchedDir:
        """Watch the directory open as `dir_fd` (by its /proc/self/fd magic link: that inode)."""
        with self.lock:
            if self._closed:
                raise Unavailable("directory watching has stopped")
            wd = _libc.inotify_add_watch(
                self._fd, f"/proc/self/fd/{dir_fd}".encode(), WATCH_MASK | IN_ONLYDIR
            )
            if wd < 0:
                err = ctypes.get_errno()
                if err == errno.ENOSPC:
                    raise ResourceExhausted("the node's limit of watched directories is reached")
                if err == errno.ENOTDIR:
                    raise InvalidArgument("not a directory")
                raise Internal(f"cannot watch directory: {os.strerror(err)}")
            watched = _WatchedDir(watcher, rel, wd)
            self._dirs.setdefault(wd, set()).add(watched)
            self._start_reader()
            return watched

    def discard(self, watched: _WatchedDir) -> None:
        """Stop delivering to `watched`; the kernel watch goes when nobody uses it."""
        with self.lock:
            users = self._dirs.get(watched.wd)
            if users is None:
                return
            users.discard(watched)
            if not users:
                del self._dirs[watched.wd]
                if not self._closed:
                    _libc.inotify_rm_watch(self._fd, watched.wd)  # EINVAL if the kernel dropped it already

    def watch_count(self) -> int:
        with self.lock:
            return len(self._dirs)

    def sync(self) -> None:
        """Dispatch every event the kernel has queued so far (in the calling thread)."""
        with self.lock:
            if self._closed:
                return
            while True:
                try:
                    data = os.read(self._fd, _READ_SIZE)
                except BlockingIOError:
                    return
                except OSError as exc:
                    log.error("reading inotify events failed: %s", exc)
                    return
                for event in parse_events(data):
                    self._dispatch(event)

    def _dispatch(self, event: RawEvent) -> None:
        if event.mask & IN_Q_OVERFLOW:
            lost = Internal("the kernel's inotify queue overflowed and events were lost; watch again")
            for watcher in {w.watcher for users in list(self._dirs.values()) for w in users}:
                watcher.fail(lost)
            return
        users = self._dirs.get(event.wd)
        if not users:
            return
        if event.mask & IN_IGNORED:  # the kernel dropped the watch (directory gone or unmounted)
            del self._dirs[event.wd]
            for watched in users:
                watched.watcher.forget(watched)
            return
        for watched in list(users):
            watched.watcher.on_event(watched, event)

    def _start_reader(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._read_loop, name="corral-inotify", daemon=True)
            self._thread.start()

    def _read_loop(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._closed:
            ready = {fd for fd, _ in poller.poll()}
            if self._wake_r in ready:
                return
            try:
                self.sync()
            except Exception:  # a bug must not stop every watch on the node
                log.exception("dispatching inotify events failed")

    def close(self) -> None:
        with self.lock:
            if self._closed:
                return
            self._closed = True
            watchers = {w.watcher for users in self._dirs.values() for w in users}
        for watcher in watchers:
            watcher.fail(Unavailable("directory watching has stopped"))
        os.write(self._wake_w, b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self.lock:
            self._dirs.clear()
            for fd in (self._fd, self._wake_r, self._wake_w):
                os.close(fd)


class Watcher:
    """One watch of one directory (recursive or not). Events queue here until taken."""

    def __init__(
        self, registry: WatcherRegistry, hub: InotifyHub, root: ConfinedRoot, path: str, *, recursive: bool,
        include_entry: bool,
    ) -> None:  # fmt: skip
        self.id = "w" + secrets.token_hex(10)
        self.path = normalize(path)
        self.recursive = recursive
        self.include_entry = include_entry
        self._registry = registry
        self._hub = hub
        self._root = root
        self._dirs: dict[str, _WatchedDir] = {}  # guarded by hub.lock
        self._lock = threading.Lock()  # guards the queue, `error`, `closed` and the waker
        self._events: collections.deque[WatchEvent] = collections.deque()
        self.error: CorralError | None = None
        self.closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Event | None = None

    # -- setup (blocking: call from a worker thread) -------------------------------------------

    def start(self) -> None:
        """Open and watch the directory (and, recursive, every directory below it)."""
        try:
            handle = self._root.open_handle(self.path)  # a symlinked directory is followed, in the root
        except NotFound:
            raise NotFound(f"path {self.path} not found") from None
        try:
            if not stat.S_ISDIR(os.fstat(handle).st_mode):
                raise InvalidArgument(f"path {self.path} not a directory")
            fd = os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # that inode
        finally:
            os.close(handle)
        with self._hub.lock:
            children = self._watch_and_list(fd, "")
            if self.recursive and children is not None:
                for _ in self._walk("", children, report=False):
                    pass

    def _walk(self, rel: str, children: Iterator[tuple[str, bool]], *, report: bool) -> Iterator[None]:
        """Watch every directory below `rel` (whose entries are `children`), pre-order and by
        name like Go's WalkDir; with `report`, each entry found is reported as CREATE."""
        stack: list[tuple[str, Iterator[tuple[str, bool]]]] = [(rel, children)]
        while stack:
            parent, entries = stack[-1]
            item = next(entries, None)
            if item is None:
                stack.pop()
                continue
            name, is_dir = item
            child = _join(parent, name)
            if report:
                self._push(WatchEvent(child, EventKind.CREATE))
            if is_dir:
                grandchildren = self._open_and_watch(child)
                if grandchildren is not None:
                    stack.append((child, grandchildren))
            yield

    def _open_and_watch(self, rel: str) -> Iterator[tuple[str, bool]] | None:
        """Watch the sub-directory `rel` (never through a symlink as its last component) and list
        it; None if it is gone or no longer a directory."""
        try:
            fd = self._root.open(posixpath.join(self.path, rel), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except CorralError:
            return None  # removed, or swapped for a symlink/file meanwhile: nothing to watch
        return self._watch_and_list(fd, rel)

    def _watch_and_list(self, fd: int, rel: str) -> Iterator[tuple[str, bool]] | None:
        """Watch the directory open as `fd` (closed here) and list its entries (name, is a dir)."""
        try:
            if self.closed or self.error is not None:
                return None
            self._watch_fd(fd, rel)
            if not self.recursive:
                return None
            found = []
            with os.scandir(fd) as it:  # scandir works on a duplicate of fd
                for entry in it:
                    if len(found) >= MAX_DIR_ENTRIES:  # bounds the work done under the hub's lock
                        raise ResourceExhausted(
                            f"directory {posixpath.join(self.path, rel)} has more than {MAX_DIR_ENTRIES} "
                            "entries: too large to watch recursively"
                        )
                    found.append((entry.name, entry.is_dir(follow_symlinks=False)))
        except OSError:
            return None
        finally:
            os.close(fd)
        return iter(sorted(found, key=lambda item: os.fsencode(item[0])))

    def _watch_fd(self, fd: int, rel: str) -> None:
        if rel in self._dirs:
            return
        self._registry.reserve_dir()
        try:
            self._dirs[rel] = self._hub.add(fd, self, rel)
        except BaseException:
            self._registry.release_dir()
            raise

    # -- events (called by the hub with hub.lock held) -----------------------------------------

    def on_event(self, watched: _WatchedDir, event: RawEvent) -> None:
        if self.closed or self.error is not None:
            return
        name = os.fsdecode(event.name)
        if not name:
            if watched.rel:
                return  # a sub-directory's own event: its parent's watch reports it already
            rel = "."
        else:
            rel = _join(watched.rel, name)
        for kind in event_kinds(event.mask):
            self._push(WatchEvent(rel, kind))
        if self.recursive and name and event.mask & IN_ISDIR:
            if event.mask & IN_MOVED_FROM:
                self._unwatch(rel)
            if event.mask & (IN_CREATE | IN_MOVED_TO):
                try:
                    children = self._open_and_watch(rel)
                    if children is not None:
                        for _ in self._walk(rel, children, report=True):
                            if self.error is not None:
                                return
                except CorralError as exc:
                    self.fail(exc)

    def forget(self, watched: _WatchedDir) -> None:
        """The kernel dropped this directory's watch."""
        if self._dirs.get(watched.rel) is watched:
            del self._dirs[watched.rel]
            self._registry.release_dir()

    def _unwatch(self, rel: str) -> None:
        prefix = rel + "/"
        for key in [k for k in self._dirs if k == rel or k.startswith(prefix)]:
            self._hub.discard(self._dirs.pop(key))
            self._registry.release_dir()

    def _push(self, event: WatchEvent) -> None:
        with self._lock:
            if self.closed or self.error is not None:
                return
            if self._registry.reserve_event():
                self._events.append(event)
                overflowed = False
            else:
                self._fail_locked(
                    ResourceExhausted(
                        f"watcher stopped: more than {MAX_QUEUED_EVENTS} events of this sandbox were waiting to be read"
                    )
                )
                overflowed = True
        if overflowed:
            self._release_dirs()
        self._wake()

    # -- ending ---------------------------------------------------------------------------------

    def fail(self, error: CorralError) -> None:
        """Stop with `error` (reported to the reader once its queue is empty)."""
        with self._lock:
            self._fail_locked(error)
        self._release_dirs()
        self._wake()

    def _fail_locked(self, error: CorralError) -> None:
        if self.error is None and not self.closed:
            self.error = error
            self._registry.release_events(len(self._events))
            self._events.clear()

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self._registry.release_events(len(self._events))
            self._events.clear()
        self._release_dirs()
        self._wake()

    def _release_dirs(self) -> None:
        with self._hub.lock:
            for watched in self._dirs.values():
                self._hub.discard(watched)
                self._registry.release_dir()
            self._dirs.clear()

    # -- reading --------------------------------------------------------------------------------

    def take(self) -> list[WatchEvent]:
        """Every queued event, oldest first; raises the watcher's error once nothing is left."""
        with self._lock:
            if self._events:
                events = list(self._events)
                self._events.clear()
                self._registry.release_events(len(events))
                return events
            if self.error is not None:
                raise self.error
            return []

    def arm(self) -> asyncio.Event:
        """An asyncio event (of the running loop) set whenever something arrives; clear it before
        each `take()` and wait on it after an empty one."""
        with self._lock:
            if self._ready is None:
                self._loop = asyncio.get_running_loop()
                self._ready = asyncio.Event()
            return self._ready

    def _wake(self) -> None:
        loop, ready = self._loop, self._ready
        if loop is not None and ready is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(ready.set)


class WatcherRegistry:
    """The watchers of one sandbox. `close()` (the sandbox is gone) stops every one of them."""

    def __init__(self) -> None:
        self._watchers: dict[str, Watcher] = {}
        self._lock = threading.Lock()  # guards the dict, the counters and `closed`
        self._hub: InotifyHub | None = None
        self._dirs = 0
        self._queued = 0
        self.closed = False

    def create(
        self,
        hub: InotifyHub,
        root: ConfinedRoot,
        path: str,
        *,
        recursive: bool = False,
        include_entry: bool = False,
    ) -> Watcher:
        """Start watching `path` (blocking: call from a worker thread)."""
        with self._lock:
            if self.closed:
                raise Unavailable("the sandbox is no longer running")
            if len(self._watchers) >= MAX_WATCHERS:
                raise ResourceExhausted(
                    f"too many directory watchers in this sandbox (at most {MAX_WATCHERS}); stop some first"
                )
            self._hub = hub
            watcher = Watcher(self, hub, root, path, recursive=recursive, include_entry=include_entry)
            self._watchers[watcher.id] = watcher
        try:
            watcher.start()
        except BaseException:
            self.discard(watcher)
            raise
        return watcher

    def get(self, watcher_id: str) -> Watcher:
        with self._lock:
            watcher = self._watchers.get(watcher_id)
        if watcher is None:
            raise NotFound(f"watcher with id {watcher_id} not found")
        return watcher

    def remove(self, watcher_id: str) -> None:
        self.discard(self.get(watcher_id))

    def discard(self, watcher: Watcher) -> None:
        with self._lock:
            self._watchers.pop(watcher.id, None)
        watcher.close()

    def __len__(self) -> int:
        with self._lock:
            return len(self._watchers)

    def sync(self) -> None:
        """Make every file change made so far visible to this sandbox's watchers (blocking)."""
        hub = self._hub
        if hub is not None and self._watchers:
            hub.sync()

    def close(self) -> None:
        with self._lock:
            self.closed = True
            watchers = list(self._watchers.values())
            self._watchers.clear()
        for watcher in watchers:
            watcher.close()

    # -- limits (called by watchers) ------------------------------------------------------------

    def reserve_dir(self) -> None:
        with self._lock:
            if self._dirs >= MAX_WATCHED_DIRS:
                raise ResourceExhausted(
                    f"too many watched directories in this sandbox (at most {MAX_WATCHED_DIRS})"
                )
            self._dirs += 1

    def release_dir(self) -> None:
        with self._lock:
            self._dirs -= 1

    def reserve_event(self) -> bool:
        with self._lock:
            if self._queued >= MAX_QUEUED_EVENTS:
                return False
            self._queued += 1
            return True

    def release_events(self, count: int) -> None:
        if count:
            with self._lock:
                self._queued -= count

    @property
    def watched_dirs(self) -> int:
        with self._lock:
            return self._dirs

    @property
    def queued_events(self) -> int:
        with self._lock:
            return self._queued

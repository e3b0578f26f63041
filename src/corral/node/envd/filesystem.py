"""envd `filesystem.Filesystem`: the Connect service over a sandbox's confined file tree.

Each RPC finds its sandbox with `lookup(request headers)` (the proxy routes by, and sets,
`e2b-sandbox-id`), picks the acting user from `Authorization: Basic base64("<user>:")` (default
`user`), resolves the request path like envd (relative and `~` under the user's home) and does the
file work in a worker thread through the sandbox's `ConfinedRoot`. Our errors become Connect
errors through `process.connect_error`, the one mapping.

Watches (`watch.py`): WatchDir streams `start`, then the events as they come, a `keepalive` after
every `Keepalive-Ping-Interval` seconds without events, until the client goes away or its
`connect-timeout-ms` elapses; CreateWatcher / GetWatcherEvents / RemoveWatcher keep a watcher in
the sandbox's registry between calls. Event entries (`include_entry`) are read when the events are
delivered. All watches of the node share one `InotifyHub`, created with the first watch.
"""

from __future__ import annotations

import asyncio
import posixpath
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TypeVar

import anyio.to_thread
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from protobuf import Oneof
from protobuf.wkt import Timestamp

from corral.core.errors import AlreadyExists, CorralError, Internal, InvalidArgument, NotFound
from corral.node.envd.context import EnvdSandbox
from corral.node.envd.entry import Entry, list_entries, read_entry, resolve_user_path
from corral.node.envd.process import SandboxGone, acting_username, connect_error
from corral.node.envd.users import lookup_user, owner_names
from corral.node.envd.watch import EventKind, InotifyHub, Watcher, WatchEvent
from corral.node.runtime.base import UserIds
from corral.spec._generated.filesystem import filesystem_pb as pb

__all__ = ["FilesystemService", "entry_to_proto", "event_messages", "keepalive_seconds"]

_T = TypeVar("_T")
SandboxLookup = Callable[[Mapping[str, str]], EnvdSandbox]
DEFAULT_KEEPALIVE_S = 90.0  # envd's interval when the client sends no Keepalive-Ping-Interval
_ENTRY_KINDS = (EventKind.CREATE, EventKind.WRITE, EventKind.CHMOD)


def keepalive_seconds(headers: Mapping[str, str]) -> float:
    try:
        return max(1.0, float(headers.get("keepalive-ping-interval", DEFAULT_KEEPALIVE_S)))
    except ValueError:
        return DEFAULT_KEEPALIVE_S


def event_messages(
    sandbox: EnvdSandbox, watcher: Watcher, events: list[WatchEvent]
) -> list[pb.FilesystemEvent]:
    """Events as protobuf messages; with `include_entry`, CREATE/WRITE/CHMOD carry the entry as it
    is now, when it still exists (blocking: reads the file system)."""
    names = owner_names(sandbox.root) if watcher.include_entry else None
    messages = []
    for event in events:
        entry = None
        if names is not None and event.kind in _ENTRY_KINDS:
            try:
                entry = entry_to_proto(
                    read_entry(sandbox.root, posixpath.join(watcher.path, event.name), names)
                )
            except CorralError:
                entry = None
        name = event.name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        messages.append(pb.FilesystemEvent(name=name, type=pb.EventType(int(event.kind)), entry=entry))
    return messages


def entry_to_proto(entry: Entry) -> pb.EntryInfo:
    return pb.EntryInfo(
        name=entry.name,
        type=pb.FileType(int(entry.type)),
        path=entry.path,
        size=entry.size,
        mode=entry.mode,
        permissions=entry.permissions,
        owner=entry.owner,
        group=entry.group,
        modified_time=Timestamp.from_nanos(entry.modified_ns) if entry.modified_ns else None,
        symlink_target=entry.symlink_target,
        metadata=dict(entry.metadata),
    )


class FilesystemService:
    """Implements the generated `Filesystem` protocol for every sandbox on this node."""

    def __init__(self, lookup: SandboxLookup) -> None:
        self._lookup = lookup
        self._hub: InotifyHub | None = None
        self._hub_lock = threading.Lock()

    def watch_hub(self) -> InotifyHub:
        """The node's inotify hub, created on first use (each one is a kernel inotify instance)."""
        with self._hub_lock:
            if self._hub is None:
                self._hub = InotifyHub()
            return self._hub

    def close(self) -> None:
        with self._hub_lock:
            if self._hub is not None:
                self._hub.close()
                self._hub = None

    async def _call(self, ctx: Any, work: Callable[[EnvdSandbox, UserIds], _T]) -> _T:
        headers = ctx.request_headers
        try:
            sandbox = self._lookup(headers)
            username = acting_username(headers, sandbox.default_user)

            def run() -> _T:
                return work(sandbox, lookup_user(sandbox.root, username))

            return await anyio.to_thread.run_sync(run)
        except CorralError as exc:
            raise connect_error(exc) from None
        except OSError as exc:  # not expected: ConfinedRoot maps errno itself
            raise connect_error(Internal(f"filesystem error: {exc.strerror}")) from None

    async def stat(self, request: pb.StatRequest, ctx: Any) -> pb.StatResponse:
        def work(sandbox: EnvdSandbox, user: UserIds) -> pb.StatResponse:
            path = resolve_user_path(request.path, user.home)
            return pb.StatResponse(entry=entry_to_proto(read_entry(sandbox.root, path)))

        return await self._call(ctx, work)

    async def make_dir(self, request: pb.MakeDirRequest, ctx: Any) -> pb.MakeDirResponse:
        def work(sandbox: EnvdSandbox, user: UserIds) -> pb.MakeDirResponse:
            root = sandbox.root
            path = resolve_user_path(request.path, user.home)
            try:
                existing = root.stat(path)
            except NotFound:
                root.makedirs(path, 0o755, uid=user.uid, gid=user.gid)
                return pb.MakeDirResponse(entry=entry_to_proto(read_entry(root, path)))
            if stat.S_ISDIR(existing.st_mode):
                raise AlreadyExists(f"directory already exists: {path}")
            raise InvalidArgument(f"path already exists but it is not a directory: {path}")

        return await self._call(ctx, work)

    async def move(self, request: pb.MoveRequest, ctx: Any) -> pb.MoveResponse:
        def work(sandbox: EnvdSandbox, user: UserIds) -> pb.MoveResponse:
            root = sandbox.root
            source = resolve_user_path(request.source, user.home)
            destination = resolve_user_path(request.destination, user.home)
            root.lstat(source)  # NotFound names the source before any directory is created
            root.makedirs(posixpath.dirname(destination), 0o755, uid=user.uid, gid=user.gid)
            root.rename(source, destination)
            return pb.MoveResponse(entry=entry_to_proto(read_entry(root, destination)))

        return await self._call(ctx, work)

    async def list_dir(self, request: pb.ListDirRequest, ctx: Any) -> pb.ListDirResponse:
        def work(sandbox: EnvdSandbox, user: UserIds) -> pb.ListDirResponse:
            path = resolve_user_path(request.path, user.home)
            entries = list_entries(sandbox.root, path, request.depth, owner_names(sandbox.root))
            return pb.ListDirResponse(entries=[entry_to_proto(e) for e in entries])

        return await self._call(ctx, work)

    async def remove(self, request: pb.RemoveRequest, ctx: Any) -> pb.RemoveResponse:
        def work(sandbox: EnvdSandbox, user: UserIds) -> pb.RemoveResponse:
            sandbox.root.remove(resolve_user_path(request.path, user.home), missing_ok=True)
            return pb.RemoveResponse()

        return await self._call(ctx, work)

    def _start_watcher(
        self, sandbox: EnvdSandbox, user: UserIds, path: str, recursive: bool, include_entry: bool
    ) -> Watcher:
        return sandbox.watchers.create(
            self.watch_hub(),
            sandbox.root,
            resolve_user_path(path, user.home),
            recursive=recursive,
            include_entry=include_entry,
        )

    async def watch_dir(self, request: pb.WatchDirRequest, ctx: Any) -> AsyncIterator[pb.WatchDirResponse]:
        def start(sandbox: EnvdSandbox, user: UserIds) -> tuple[EnvdSandbox, Watcher]:
            return sandbox, self._start_watcher(
                sandbox, user, request.path, request.recursive, request.include_entry
            )

        sandbox, watcher = await self._call(ctx, start)
        try:
            ready = watcher.arm()
            yield pb.WatchDirResponse(event=Oneof("start", pb.WatchDirResponse.StartEvent()))
            keepalive = keepalive_seconds(ctx.request_headers)
            timeout_ms = ctx.timeout_ms
            deadline = time.monotonic() + timeout_ms / 1000.0 if timeout_ms else None
            while True:
                ready.clear()
                try:
                    events = watcher.take()
                except CorralError as exc:
                    raise connect_error(exc) from None
                if events:
                    if watcher.include_entry:  # reads entries: off the event loop
                        messages = await anyio.to_thread.run_sync(event_messages, sandbox, watcher, events)
                    else:
                        messages = event_messages(sandbox, watcher, events)
                    for message in messages:
                        yield pb.WatchDirResponse(event=Oneof("filesystem", message))
                    continue
                if watcher.closed:
                    if sandbox.watchers.closed:
                        raise SandboxGone(sandbox.sandbox_id)
                    return
                wait = keepalive if deadline is None else min(keepalive, deadline - time.monotonic())
                try:
                    await asyncio.wait_for(ready.wait(), timeout=max(0.0, wait))
                except TimeoutError:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise ConnectError(Code.DEADLINE_EXCEEDED, "the watch reached its timeout") from None
                    yield pb.WatchDirResponse(event=Oneof("keepalive", pb.WatchDirResponse.KeepAlive()))
        finally:
            sandbox.watchers.discard(watcher)

    async def create_watcher(self, request: pb.CreateWatcherRequest, ctx: Any) -> pb.CreateWatcherResponse:
        def work(sandbox: EnvdSandbox, user: UserIds) -> pb.CreateWatcherResponse:
            watcher = self._start_watcher(
                sandbox, user, request.path, request.recursive, request.include_entry
            )
            return pb.CreateWatcherResponse(watcher_id=watcher.id)

        return await self._call(ctx, work)

    async def get_watcher_events(
        self, request: pb.GetWatcherEventsRequest, ctx: Any
    ) -> pb.GetWatcherEventsResponse:
        def work(sandbox: EnvdSandbox, user: UserIds) -> pb.GetWatcherEventsResponse:
            watcher = sandbox.watchers.get(request.watcher_id)
            sandbox.watchers.sync()  # everything that happened before this call is in the answer
            return pb.GetWatcherEventsResponse(events=event_messages(sandbox, watcher, watcher.take()))

        return await self._call(ctx, work)

    async def remove_watcher(self, request: pb.RemoveWatcherRequest, ctx: Any) -> pb.RemoveWatcherResponse:
        def work(sandbox: EnvdSandbox, user: UserIds) -> pb.RemoveWatcherResponse:
            sandbox.watchers.remove(request.watcher_id)
            return pb.RemoveWatcherResponse()

        return await self._call(ctx, work)

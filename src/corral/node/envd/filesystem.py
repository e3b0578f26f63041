"""envd `filesystem.Filesystem`: the Connect service over a sandbox's confined file tree.

Each RPC finds its sandbox with `lookup(request headers)` (the proxy routes by, and sets,
`e2b-sandbox-id`), picks the acting user from `Authorization: Basic base64("<user>:")` (default
`user`), resolves the request path like envd (relative and `~` under the user's home) and does the
file work in a worker thread through the sandbox's `ConfinedRoot`. Our errors become Connect
errors through `process.connect_error`, the one mapping.

Watch RPCs (WatchDir, CreateWatcher, GetWatcherEvents, RemoveWatcher) answer UNIMPLEMENTED.
"""

from __future__ import annotations

import posixpath
import stat
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TypeVar

import anyio.to_thread
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from protobuf.wkt import Timestamp

from corral.core.errors import AlreadyExists, CorralError, Internal, InvalidArgument, NotFound
from corral.node.envd.context import EnvdSandbox
from corral.node.envd.entry import Entry, list_entries, read_entry, resolve_user_path
from corral.node.envd.process import acting_username, connect_error
from corral.node.envd.users import lookup_user, owner_names
from corral.node.runtime.base import UserIds
from corral.spec._generated.filesystem import filesystem_pb as pb

__all__ = ["FilesystemService", "entry_to_proto"]

_T = TypeVar("_T")
SandboxLookup = Callable[[Mapping[str, str]], EnvdSandbox]


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

    async def _call(self, ctx: Any, work: Callable[[EnvdSandbox, UserIds], _T]) -> _T:
        headers = ctx.request_headers
        try:
            sandbox = self._lookup(headers)
            username = acting_username(headers)

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

    def watch_dir(self, request: pb.WatchDirRequest, ctx: Any) -> AsyncIterator[pb.WatchDirResponse]:
        raise ConnectError(Code.UNIMPLEMENTED, "watching directories is not implemented yet")

    async def create_watcher(self, request: pb.CreateWatcherRequest, ctx: Any) -> pb.CreateWatcherResponse:
        raise ConnectError(Code.UNIMPLEMENTED, "watching directories is not implemented yet")

    async def get_watcher_events(
        self, request: pb.GetWatcherEventsRequest, ctx: Any
    ) -> pb.GetWatcherEventsResponse:
        raise ConnectError(Code.UNIMPLEMENTED, "watching directories is not implemented yet")

    async def remove_watcher(self, request: pb.RemoveWatcherRequest, ctx: Any) -> pb.RemoveWatcherResponse:
        raise ConnectError(Code.UNIMPLEMENTED, "watching directories is not implemented yet")

"""Corral's Python SDK: sandboxes, commands, files, terminals and git, sync and async.

    from corral import Sandbox

    with Sandbox.create() as sandbox:
        print(sandbox.commands.run("echo hello").stdout)

The async twin (`AsyncSandbox`, ...) is the source; the sync one is generated from it by
`scripts/unasync.py`. Both speak E2B's wire protocol, so they work against Corral and E2B.
Only `httpx` is needed; nothing here imports the server.
"""

from corral.sdk._async import (
    AsyncCommandHandle,
    AsyncCommands,
    AsyncFileStreamReader,
    AsyncFilesystem,
    AsyncGit,
    AsyncPty,
    AsyncSandbox,
    AsyncSandboxPaginator,
    AsyncWatchHandle,
)
from corral.sdk._config import UNSET, ConnectionConfig, ConnectionOptions, Unset
from corral.sdk._errors import (
    AlreadyExistsException,
    AuthenticationException,
    CommandExitException,
    CommandResult,
    ConnectionException,
    FileNotFoundException,
    GitAuthException,
    GitUpstreamException,
    InvalidArgumentException,
    NotFoundException,
    NotSupportedException,
    PermissionDeniedException,
    RateLimitException,
    SandboxException,
    SandboxNotFoundException,
    TimeoutException,
)
from corral.sdk._git import GitBranches, GitFileStatus, GitStatus
from corral.sdk._handlers import AsyncOutputHandler, OutputHandler
from corral.sdk._models import (
    EntryInfo,
    FilesystemEvent,
    FilesystemEventType,
    FileType,
    ProcessInfo,
    PtySize,
    SandboxInfo,
    SandboxLifecycle,
    SandboxMetrics,
    SandboxNetworkOpts,
    SandboxQuery,
    SandboxState,
    WriteEntry,
    WriteInfo,
)
from corral.sdk._sync import (
    CommandHandle,
    Commands,
    FileStreamReader,
    Filesystem,
    Git,
    Pty,
    Sandbox,
    SandboxPaginator,
    WatchHandle,
)

__all__ = [
    "UNSET",
    "AlreadyExistsException",
    "AsyncCommandHandle",
    "AsyncCommands",
    "AsyncFileStreamReader",
    "AsyncFilesystem",
    "AsyncGit",
    "AsyncOutputHandler",
    "AsyncPty",
    "AsyncSandbox",
    "AsyncSandboxPaginator",
    "AsyncWatchHandle",
    "AuthenticationException",
    "CommandExitException",
    "CommandHandle",
    "CommandResult",
    "Commands",
    "ConnectionConfig",
    "ConnectionException",
    "ConnectionOptions",
    "EntryInfo",
    "FileNotFoundException",
    "FileStreamReader",
    "FileType",
    "Filesystem",
    "FilesystemEvent",
    "FilesystemEventType",
    "Git",
    "GitAuthException",
    "GitBranches",
    "GitFileStatus",
    "GitStatus",
    "GitUpstreamException",
    "InvalidArgumentException",
    "NotFoundException",
    "NotSupportedException",
    "OutputHandler",
    "PermissionDeniedException",
    "ProcessInfo",
    "Pty",
    "PtySize",
    "RateLimitException",
    "Sandbox",
    "SandboxException",
    "SandboxInfo",
    "SandboxLifecycle",
    "SandboxMetrics",
    "SandboxNetworkOpts",
    "SandboxNotFoundException",
    "SandboxPaginator",
    "SandboxQuery",
    "SandboxState",
    "TimeoutException",
    "Unset",
    "WatchHandle",
    "WriteEntry",
    "WriteInfo",
]

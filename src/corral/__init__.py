"""Corral: self-hosted secure sandboxes for AI agents, wire-compatible with E2B.

The SDK is importable from here (`from corral import Sandbox, AsyncSandbox, ...`); it is loaded
on first use, so `import corral` stays cheap and needs only the base install (httpx, typer,
rich). The server lives in `corral.server` and is never imported from here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from corral.sdk import (
        UNSET,
        AlreadyExistsException,
        AsyncCommandHandle,
        AsyncCommands,
        AsyncFileStreamReader,
        AsyncFilesystem,
        AsyncGit,
        AsyncOutputHandler,
        AsyncPty,
        AsyncSandbox,
        AsyncSandboxPaginator,
        AsyncWatchHandle,
        AuthenticationException,
        CommandExitException,
        CommandHandle,
        CommandResult,
        Commands,
        ConnectionConfig,
        ConnectionException,
        ConnectionOptions,
        EntryInfo,
        FileNotFoundException,
        FileStreamReader,
        Filesystem,
        FilesystemEvent,
        FilesystemEventType,
        FileType,
        Git,
        GitAuthException,
        GitBranches,
        GitFileStatus,
        GitStatus,
        GitUpstreamException,
        InvalidArgumentException,
        NotFoundException,
        NotSupportedException,
        OutputHandler,
        PermissionDeniedException,
        ProcessInfo,
        Pty,
        PtySize,
        RateLimitException,
        Sandbox,
        SandboxException,
        SandboxInfo,
        SandboxLifecycle,
        SandboxMetrics,
        SandboxNetworkOpts,
        SandboxNotFoundException,
        SandboxPaginator,
        SandboxQuery,
        SandboxState,
        TimeoutException,
        Unset,
        WatchHandle,
        WriteEntry,
        WriteInfo,
    )

__version__ = "0.1.0"

# Everything the SDK exports, re-exported lazily (kept equal to corral.sdk.__all__ by a test).
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
    "__version__",
]
_SDK_NAMES = frozenset(__all__) - {"__version__"}


def __getattr__(name: str) -> Any:
    if name in _SDK_NAMES:
        value = getattr(importlib.import_module("corral.sdk"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'corral' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

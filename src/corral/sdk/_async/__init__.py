"""The SDK clients. The async code is the source; `scripts/unasync.py` generates the sync twin."""

from corral.sdk._async.commands import AsyncCommandHandle, AsyncCommands, AsyncPty
from corral.sdk._async.filesystem import AsyncFileStreamReader, AsyncFilesystem, AsyncWatchHandle
from corral.sdk._async.git import AsyncGit
from corral.sdk._async.paginator import AsyncSandboxPaginator
from corral.sdk._async.sandbox import AsyncSandbox

__all__ = [
    "AsyncCommandHandle",
    "AsyncCommands",
    "AsyncFileStreamReader",
    "AsyncFilesystem",
    "AsyncGit",
    "AsyncPty",
    "AsyncSandbox",
    "AsyncSandboxPaginator",
    "AsyncWatchHandle",
]

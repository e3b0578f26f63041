"""The SDK's data types and their parsers from wire JSON (REST and envd). No I/O.

Field names follow E2B's Python SDK, so code written against it reads the same values.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import enum
from collections.abc import Mapping
from typing import Any, Literal, TypedDict

from corral.sdk._errors import SandboxException

__all__ = [
    "DEFAULT_PTY_SIZE",
    "EntryInfo",
    "FileType",
    "FilesystemEvent",
    "FilesystemEventType",
    "ProcessInfo",
    "PtySize",
    "SandboxInfo",
    "SandboxLifecycle",
    "SandboxMetrics",
    "SandboxNetworkOpts",
    "SandboxQuery",
    "SandboxState",
    "WriteEntry",
    "WriteInfo",
    "b64decode",
    "entry_info_from_json",
    "filesystem_event_from_json",
    "parse_time",
    "process_info_from_json",
    "sandbox_info_from_json",
    "sandbox_metrics_from_json",
    "write_info_from_json",
]


def parse_time(value: str) -> dt.datetime:
    """RFC 3339 (`...Z`, fractional seconds of any length) to an aware datetime."""
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    if "." in text:
        head, _, rest = text.partition(".")
        digits = ""
        while rest and rest[0].isdigit():
            digits, rest = digits + rest[0], rest[1:]
        text = f"{head}.{(digits + '000000')[:6]}{rest}"
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        raise SandboxException(
            f"the server sent a time that is not RFC 3339: {value!r}", code="internal"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def b64decode(value: str) -> bytes:
    """protobuf-JSON bytes: standard or URL-safe base64, padding optional."""
    text = value.replace("-", "+").replace("_", "/")
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _int(value: Any, default: int = 0) -> int:
    """protobuf-JSON integers arrive as numbers or (64-bit ones) as strings."""
    if value is None or value == "":
        return default
    return int(value)


class SandboxState(enum.StrEnum):
    """Where a sandbox is in its life, as the API reports it."""

    RUNNING = "running"
    """Running; commands and files work."""
    PAUSED = "paused"
    """Paused; `connect()` resumes it."""


class SandboxNetworkOpts(TypedDict, total=False):
    """Egress and ingress rules for a new sandbox (all keys optional)."""

    allow_out: list[str]
    """Addresses/CIDRs the sandbox may reach even when `deny_out` covers them."""
    deny_out: list[str]
    """Addresses/CIDRs the sandbox must not reach (`"0.0.0.0/0"` = everything)."""
    allow_public_traffic: bool
    """False: requests to sandbox ports need the `e2b-traffic-access-token` header."""
    mask_request_host: str
    """Host header to send to sandbox ports (`${PORT}` is replaced)."""


class SandboxLifecycle(TypedDict, total=False):
    """What happens when a sandbox's timeout passes."""

    on_timeout: Literal["kill", "pause"]
    """`kill` (the default) or `pause`."""
    auto_resume: bool
    """Resume a paused sandbox when traffic arrives for it (only with `on_timeout="pause"`)."""
    keep_memory: bool
    """With `pause`: keep process memory (True, default) or only the filesystem."""


@dataclasses.dataclass(frozen=True)
class SandboxQuery:
    """Filters for `Sandbox.list()`. Every given filter must match (AND)."""

    metadata: Mapping[str, str] | None = None
    """Only sandboxes whose metadata has all these key/value pairs."""
    state: tuple[SandboxState, ...] | list[SandboxState] | None = None
    """Only these states (default: running and paused)."""
    started_after: dt.datetime | None = None
    """Only sandboxes started at or after this time."""
    template: str | None = None
    """Only sandboxes of this template (id or name)."""


@dataclasses.dataclass(frozen=True)
class SandboxInfo:
    """A sandbox as the API describes it (`get_info()` and `list()`)."""

    sandbox_id: str
    """The sandbox's id."""
    template_id: str
    """The template it was created from."""
    name: str | None
    """The template's alias, when it has one."""
    metadata: dict[str, str]
    """Metadata given at creation."""
    started_at: dt.datetime
    """When it started."""
    end_at: dt.datetime
    """When its timeout passes."""
    state: SandboxState
    """Running or paused."""
    cpu_count: int
    """vCPUs."""
    memory_mb: int
    """Memory in MiB."""
    disk_size_mb: int
    """Disk size in MiB."""
    envd_version: str
    """The envd protocol version it speaks."""
    sandbox_domain: str | None = None
    """Domain of its `{port}-{id}.{domain}` hosts (only from `get_info()`)."""
    allow_internet_access: bool | None = None
    """Whether egress is allowed (only from `get_info()`)."""
    lifecycle: dict[str, Any] | None = None
    """`{"on_timeout": "kill"|"pause", "auto_resume": bool}` (only from `get_info()`)."""


def sandbox_info_from_json(body: Mapping[str, Any]) -> SandboxInfo:
    """`ListedSandbox` or `SandboxDetail` JSON to a `SandboxInfo`."""
    try:
        lifecycle = body.get("lifecycle")
        return SandboxInfo(
            sandbox_id=body["sandboxID"],
            template_id=body["templateID"],
            name=body.get("alias") if isinstance(body.get("alias"), str) else None,
            metadata=dict(body.get("metadata") or {}),
            started_at=parse_time(body["startedAt"]),
            end_at=parse_time(body["endAt"]),
            state=SandboxState(body["state"]),
            cpu_count=_int(body.get("cpuCount")),
            memory_mb=_int(body.get("memoryMB")),
            disk_size_mb=_int(body.get("diskSizeMB")),
            envd_version=str(body.get("envdVersion", "")),
            sandbox_domain=body.get("domain") if isinstance(body.get("domain"), str) else None,
            allow_internet_access=body.get("allowInternetAccess")
            if isinstance(body.get("allowInternetAccess"), bool)
            else None,
            lifecycle=(
                {"on_timeout": lifecycle.get("onTimeout"), "auto_resume": lifecycle.get("autoResume")}
                if isinstance(lifecycle, dict)
                else None
            ),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise SandboxException(
            f"the server sent a sandbox description the SDK cannot read: {exc!r}", code="internal"
        ) from None


@dataclasses.dataclass(frozen=True)
class SandboxMetrics:
    """One resource-usage sample of a sandbox."""

    timestamp: dt.datetime
    """When it was taken."""
    cpu_count: int
    """vCPUs."""
    cpu_used_pct: float
    """CPU use in percent of all vCPUs."""
    mem_used: int
    """Memory in use, bytes."""
    mem_total: int
    """Memory limit, bytes."""
    mem_cache: int
    """Page cache, bytes."""
    disk_used: int
    """Disk in use, bytes."""
    disk_total: int
    """Disk size, bytes."""


def sandbox_metrics_from_json(body: Mapping[str, Any]) -> SandboxMetrics:
    """`SandboxMetric` JSON to `SandboxMetrics`."""
    try:
        stamp = body.get("timestamp")
        timestamp = (
            parse_time(stamp)
            if isinstance(stamp, str)
            else dt.datetime.fromtimestamp(_int(body.get("timestampUnix")), dt.UTC)
        )
        return SandboxMetrics(
            timestamp=timestamp,
            cpu_count=_int(body.get("cpuCount")),
            cpu_used_pct=float(body.get("cpuUsedPct") or 0.0),
            mem_used=_int(body.get("memUsed")),
            mem_total=_int(body.get("memTotal")),
            mem_cache=_int(body.get("memCache")),
            disk_used=_int(body.get("diskUsed")),
            disk_total=_int(body.get("diskTotal")),
        )
    except (ValueError, TypeError) as exc:
        raise SandboxException(
            f"the server sent metrics the SDK cannot read: {exc!r}", code="internal"
        ) from None


@dataclasses.dataclass(frozen=True)
class PtySize:
    """Size of a pseudo-terminal in character cells."""

    rows: int
    """Lines."""
    cols: int
    """Columns."""


DEFAULT_PTY_SIZE = PtySize(rows=24, cols=80)
"""The size a terminal gets when none is asked for."""


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """A command or PTY session running in the sandbox."""

    pid: int
    """Process id (inside the sandbox)."""
    tag: str | None
    """Tag given at start (e.g. a template's start command), else None."""
    cmd: str
    """Executable."""
    args: list[str]
    """Arguments."""
    envs: dict[str, str]
    """Environment given at start."""
    cwd: str | None
    """Working directory given at start."""


def process_info_from_json(body: Mapping[str, Any]) -> ProcessInfo:
    """`ProcessInfo` JSON (camelCase or snake_case) to `ProcessInfo`."""
    config = body.get("config") or {}
    return ProcessInfo(
        pid=_int(body.get("pid")),
        tag=body.get("tag"),
        cmd=config.get("cmd", ""),
        args=list(config.get("args") or []),
        envs=dict(config.get("envs") or {}),
        cwd=config.get("cwd"),
    )


class FileType(enum.Enum):
    """What a filesystem entry is."""

    FILE = "file"
    """A regular file."""
    DIR = "dir"
    """A directory."""
    SYMLINK = "symlink"
    """A symbolic link (`type` of a listed symlink is its target's; see `symlink_target`)."""


_FILE_TYPES = {
    "FILE_TYPE_FILE": FileType.FILE,
    "FILE_TYPE_DIRECTORY": FileType.DIR,
    "FILE_TYPE_SYMLINK": FileType.SYMLINK,
    1: FileType.FILE,
    2: FileType.DIR,
    3: FileType.SYMLINK,
    "file": FileType.FILE,
    "dir": FileType.DIR,
    "directory": FileType.DIR,
}


@dataclasses.dataclass(frozen=True)
class WriteInfo:
    """A file that was written."""

    name: str
    """Base name."""
    type: FileType | None
    """Entry type (a write makes a file)."""
    path: str
    """Absolute path in the sandbox."""
    metadata: dict[str, str] | None = None
    """Metadata stored on the file, None when it has none."""


def write_info_from_json(body: Mapping[str, Any]) -> WriteInfo:
    """An item of the `/files` upload answer to `WriteInfo`."""
    return WriteInfo(
        name=body.get("name", ""),
        type=_FILE_TYPES.get(body.get("type", "")),
        path=body.get("path", ""),
        metadata=dict(body["metadata"]) if body.get("metadata") else None,
    )


@dataclasses.dataclass(frozen=True)
class EntryInfo:
    """A filesystem entry with its attributes."""

    name: str
    """Base name."""
    type: FileType | None
    """File, directory or symlink (None for a broken symlink)."""
    path: str
    """Absolute path in the sandbox."""
    size: int
    """Size in bytes (of the link itself for symlinks)."""
    mode: int
    """Permission bits (of the target for symlinks), e.g. 0o644."""
    permissions: str
    """`ls -l`-style permissions, e.g. `-rw-r--r--`."""
    owner: str
    """Owning user name."""
    group: str
    """Owning group name."""
    modified_time: dt.datetime
    """Last modification."""
    symlink_target: str | None = None
    """Resolved absolute target, for symlinks only."""
    metadata: dict[str, str] | None = None
    """User metadata stored on the file, None when it has none."""


def entry_info_from_json(body: Mapping[str, Any]) -> EntryInfo:
    """envd `EntryInfo` JSON to `EntryInfo`."""
    modified = body.get("modifiedTime") or body.get("modified_time")
    target = body.get("symlinkTarget", body.get("symlink_target"))
    return EntryInfo(
        name=body.get("name", ""),
        type=_FILE_TYPES.get(body.get("type", 0)),
        path=body.get("path", ""),
        size=_int(body.get("size")),
        mode=_int(body.get("mode")),
        permissions=body.get("permissions", ""),
        owner=body.get("owner", ""),
        group=body.get("group", ""),
        modified_time=parse_time(modified) if modified else dt.datetime.fromtimestamp(0, dt.UTC),
        symlink_target=target,
        metadata=dict(body["metadata"]) if body.get("metadata") else None,
    )


class FilesystemEventType(enum.Enum):
    """What happened to a watched entry."""

    CREATE = "create"
    """Created."""
    WRITE = "write"
    """Written to."""
    REMOVE = "remove"
    """Removed."""
    RENAME = "rename"
    """Renamed (moved away)."""
    CHMOD = "chmod"
    """Permissions or ownership changed."""


_EVENT_TYPES = {
    "EVENT_TYPE_CREATE": FilesystemEventType.CREATE,
    "EVENT_TYPE_WRITE": FilesystemEventType.WRITE,
    "EVENT_TYPE_REMOVE": FilesystemEventType.REMOVE,
    "EVENT_TYPE_RENAME": FilesystemEventType.RENAME,
    "EVENT_TYPE_CHMOD": FilesystemEventType.CHMOD,
    1: FilesystemEventType.CREATE,
    2: FilesystemEventType.WRITE,
    3: FilesystemEventType.REMOVE,
    4: FilesystemEventType.RENAME,
    5: FilesystemEventType.CHMOD,
}


@dataclasses.dataclass(frozen=True)
class FilesystemEvent:
    """One change in a watched directory."""

    name: str
    """Path of the entry relative to the watched directory."""
    type: FilesystemEventType
    """What happened."""
    entry: EntryInfo | None = None
    """The entry after the change, when asked for with `include_entry=True`."""


def filesystem_event_from_json(body: Mapping[str, Any]) -> FilesystemEvent | None:
    """envd `FilesystemEvent` JSON to `FilesystemEvent` (None for an unknown event type)."""
    kind = _EVENT_TYPES.get(body.get("type", 0))
    if kind is None:
        return None
    entry = body.get("entry")
    return FilesystemEvent(
        name=body.get("name", ""), type=kind, entry=entry_info_from_json(entry) if entry else None
    )


class WriteEntry(TypedDict):
    """One file for `files.write_files()`: where and what."""

    path: str
    data: str | bytes | Any

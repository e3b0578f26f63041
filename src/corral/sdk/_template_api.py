"""Template builds on the wire (e2b-protocol.md §2.3, §2.4): requests as data, answers as types,
and the exceptions a build raises. No I/O.

A build is four kinds of calls (E2B's `Template.build`):

    POST /v3/templates                           request_build_request → BuildInfo
    GET  /templates/{id}/files/{hash}            upload_link_request   → UploadLink (then PUT url)
    POST /v2/templates/{id}/builds/{buildID}     start_build_request (the plan in E2B's shape)
    GET  /templates/{id}/builds/{buildID}/status?logsOffset=N → TemplateBuildStatusResponse

plus `GET /templates/aliases/{name}` (exists), the tag routes and `GET`/`DELETE /templates`.

    SandboxException
     └── BuildException          a build could not be requested, started or finished
          └── FileUploadException  a COPY source could not be packed or uploaded
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from corral.sdk._api import ApiRequest
from corral.sdk._errors import (
    InvalidArgumentException,
    SandboxException,
    error_from_body,
)
from corral.sdk._models import parse_time

__all__ = [
    "BuildException",
    "BuildInfo",
    "BuildStatusReason",
    "FileUploadException",
    "LogEntry",
    "LogEntryEnd",
    "LogEntryLevel",
    "LogEntryStart",
    "TemplateBuildStatus",
    "TemplateBuildStatusResponse",
    "TemplateInfo",
    "TemplateTag",
    "TemplateTagInfo",
    "UploadLink",
    "alias_request",
    "assign_tags_request",
    "build_error",
    "build_info_from_json",
    "build_status_from_json",
    "build_status_request",
    "delete_template_request",
    "list_tags_request",
    "list_templates_request",
    "remove_tags_request",
    "request_build_request",
    "start_build_request",
    "tag_info_from_json",
    "tags_from_json",
    "template_info_from_json",
    "upload_link_from_json",
    "upload_link_request",
]

LogEntryLevel = Literal["debug", "info", "warn", "error"]
"""Severity of a build log entry."""

_ANSI = re.compile(
    r"(?:\x1b[\]PX^_][\s\S]*?(?:\x07|\x1b\\|\x9c))|[\x1b\x9b][\[\]()#;?]*(?:\d{1,4}(?:[;:]\d{0,4})*)?[\dA-PR-TZcf-nq-uy=><~]"
)


class BuildException(SandboxException):
    """A template build failed: refused by the server, a step failed, or it could not finish.

    `step` is the server's step name (`"0"` the base, `"1"`… the steps in order, `"finalize"`
    the start/ready commands) when the build failed at a step; `instruction` says what that step
    is (`RUN make`), `origin` where the template added it (`build.py:12`), when known.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        step: str | None = None,
        instruction: str | None = None,
        origin: str | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.step = step
        self.instruction = instruction
        self.origin = origin


class FileUploadException(BuildException):
    """The files of a `copy()` could not be found, packed or uploaded."""


class TemplateBuildStatus(enum.StrEnum):
    """Where a build is: waiting (requested) → building → ready | error."""

    BUILDING = "building"
    WAITING = "waiting"
    READY = "ready"
    ERROR = "error"


@dataclasses.dataclass
class LogEntry:
    """One line of a build's log (the server's, or the client's own progress lines)."""

    timestamp: dt.datetime
    level: LogEntryLevel
    message: str
    step: str | None = None
    """The build step the line belongs to (`"0"`, `"1"`…, `"finalize"`), when the server says."""

    def __post_init__(self) -> None:
        self.message = _ANSI.sub("", self.message)

    def __str__(self) -> str:
        return f"[{self.timestamp.isoformat()}] [{self.level}] {self.message}"


@dataclasses.dataclass
class LogEntryStart(LogEntry):
    """The first entry `on_build_logs` gets: the build started."""

    level: LogEntryLevel = dataclasses.field(default="debug", init=False)


@dataclasses.dataclass
class LogEntryEnd(LogEntry):
    """The last entry `on_build_logs` gets, also after a failure: the build is over."""

    level: LogEntryLevel = dataclasses.field(default="debug", init=False)


@dataclasses.dataclass
class BuildStatusReason:
    """Why a build is in its status (for `error`: the message and the failing step)."""

    message: str
    step: str | None = None
    log_entries: list[LogEntry] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class TemplateBuildStatusResponse:
    """A build's status and the log entries from the requested offset on (at most 100)."""

    build_id: str
    template_id: str
    status: TemplateBuildStatus
    log_entries: list[LogEntry]
    logs: list[str]
    """The same entries as plain text (deprecated by E2B; use `log_entries`)."""
    reason: BuildStatusReason | None = None


@dataclasses.dataclass
class BuildInfo:
    """A requested build: which template and build, under which name and tags."""

    template_id: str
    build_id: str
    name: str
    alias: str
    """The same as `name` (E2B's deprecated spelling)."""
    tags: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class TemplateTag:
    """One tag of a template and the build it points to."""

    tag: str
    build_id: str
    created_at: dt.datetime


@dataclasses.dataclass
class TemplateTagInfo:
    """Tags just assigned and the build they point to."""

    build_id: str
    tags: list[str]


@dataclasses.dataclass
class TemplateInfo:
    """A template of your team (`Template.list()`)."""

    template_id: str
    build_id: str
    names: list[str]
    cpu_count: int
    memory_mb: int
    disk_size_mb: int | None
    public: bool
    created_at: dt.datetime
    updated_at: dt.datetime
    build_status: str
    envd_version: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class UploadLink:
    """Whether the server has a COPY archive already, and where to PUT it."""

    present: bool
    url: str | None


# -- requests ---------------------------------------------------------------------------------------


def _segment(value: str, what: str) -> str:
    if not value:
        raise InvalidArgumentException(f"{what} must not be empty")
    return urllib.parse.quote(value, safe="")


def request_build_request(
    name: str, tags: Sequence[str] | None, cpu_count: int, memory_mb: int, runtime: str | None = None
) -> ApiRequest:
    """`POST /v3/templates` (tags left out when there are none, as E2B's SDK does). `runtime` is
    Corral's own field (the OCI runtime of the template's sandboxes), sent only when given."""
    if not name:
        raise InvalidArgumentException("a template name is required, e.g. 'my-template' or 'my-template:v1'")
    if cpu_count < 1:
        raise InvalidArgumentException(f"cpu_count must be at least 1, got {cpu_count}")
    if memory_mb < 128:
        raise InvalidArgumentException(f"memory_mb must be at least 128, got {memory_mb}")
    body: dict[str, Any] = {"name": name, "cpuCount": int(cpu_count), "memoryMB": int(memory_mb)}
    if tags:
        body["tags"] = list(tags)
    if runtime:
        body["runtime"] = runtime
    return ApiRequest("POST", "/v3/templates", json=body)


def upload_link_request(template_id: str, files_hash: str) -> ApiRequest:
    """`GET /templates/{id}/files/{hash}`."""
    return ApiRequest(
        "GET", f"/templates/{_segment(template_id, 'template id')}/files/{_segment(files_hash, 'files hash')}"
    )


def start_build_request(template_id: str, build_id: str, body: Mapping[str, Any]) -> ApiRequest:
    """`POST /v2/templates/{id}/builds/{buildID}` with the plan (`plan_to_e2b`)."""
    path = f"/v2/templates/{_segment(template_id, 'template id')}/builds/{_segment(build_id, 'build id')}"
    return ApiRequest("POST", path, json=dict(body))


def build_status_request(template_id: str, build_id: str, logs_offset: int = 0) -> ApiRequest:
    """`GET /templates/{id}/builds/{buildID}/status?logsOffset=N`."""
    if logs_offset < 0:
        raise InvalidArgumentException(f"logs_offset must be >= 0, got {logs_offset}")
    path = f"/templates/{_segment(template_id, 'template id')}/builds/{_segment(build_id, 'build id')}/status"
    return ApiRequest("GET", path, params=(("logsOffset", str(int(logs_offset))),))


def alias_request(name: str) -> ApiRequest:
    """`GET /templates/aliases/{name}` (200, or 403 from E2B for another team's: it exists; 404: it does not)."""
    return ApiRequest("GET", f"/templates/aliases/{_segment(name, 'template name')}")


def _tag_list(tags: str | Sequence[str]) -> list[str]:
    values = [tags] if isinstance(tags, str) else list(tags)
    if not values:
        raise InvalidArgumentException("at least one tag is required")
    return values


def assign_tags_request(target_name: str, tags: str | Sequence[str]) -> ApiRequest:
    """`POST /templates/tags` `{"target": "name:tag", "tags": [...]}`."""
    if not target_name:
        raise InvalidArgumentException("a target 'name' or 'name:tag' is required")
    return ApiRequest("POST", "/templates/tags", json={"target": target_name, "tags": _tag_list(tags)})


def remove_tags_request(name: str, tags: str | Sequence[str]) -> ApiRequest:
    """`DELETE /templates/tags` `{"name": ..., "tags": [...]}`."""
    if not name:
        raise InvalidArgumentException("a template name is required")
    return ApiRequest("DELETE", "/templates/tags", json={"name": name, "tags": _tag_list(tags)})


def list_tags_request(template: str) -> ApiRequest:
    """`GET /templates/{idOrName}/tags`."""
    return ApiRequest("GET", f"/templates/{_segment(template, 'template id or name')}/tags")


def list_templates_request() -> ApiRequest:
    """`GET /templates` (the team's own templates)."""
    return ApiRequest("GET", "/templates")


def delete_template_request(template: str) -> ApiRequest:
    """`DELETE /templates/{idOrName}`."""
    return ApiRequest("DELETE", f"/templates/{_segment(template, 'template id or name')}")


# -- answers ----------------------------------------------------------------------------------------


def _missing(what: str, exc: Exception) -> SandboxException:
    return SandboxException(f"the server's {what} answer lacks {exc}", code="unknown")


def build_info_from_json(body: Mapping[str, Any], name: str) -> BuildInfo:
    """The `POST /v3/templates` answer."""
    try:
        return BuildInfo(
            template_id=str(body["templateID"]),
            build_id=str(body["buildID"]),
            name=name,
            alias=name,
            tags=[str(tag) for tag in body.get("tags") or []],
        )
    except (KeyError, TypeError) as exc:
        raise _missing("build request", exc) from None


def upload_link_from_json(body: Mapping[str, Any]) -> UploadLink:
    """The `GET /templates/{id}/files/{hash}` answer."""
    url = body.get("url")
    return UploadLink(present=bool(body.get("present")), url=url if isinstance(url, str) and url else None)


def _log_entry(item: Mapping[str, Any]) -> LogEntry:
    level = item.get("level")
    step = item.get("step")
    return LogEntry(
        timestamp=parse_time(str(item["timestamp"])),
        level=level if level in ("debug", "info", "warn", "error") else "info",
        message=str(item.get("message", "")),
        step=str(step) if step not in (None, "") else None,
    )


def build_status_from_json(body: Mapping[str, Any]) -> TemplateBuildStatusResponse:
    """The `GET …/status` answer."""
    try:
        reason_body = body.get("reason")
        reason = None
        if isinstance(reason_body, Mapping):
            step = reason_body.get("step")
            reason = BuildStatusReason(
                message=str(reason_body.get("message") or ""),
                step=str(step) if step not in (None, "") else None,
                log_entries=[_log_entry(e) for e in reason_body.get("logEntries") or []],
            )
        return TemplateBuildStatusResponse(
            build_id=str(body["buildID"]),
            template_id=str(body["templateID"]),
            status=TemplateBuildStatus(body["status"]),
            log_entries=[_log_entry(e) for e in body.get("logEntries") or []],
            logs=[str(line) for line in body.get("logs") or []],
            reason=reason,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise _missing("build status", exc) from None


def tag_info_from_json(body: Mapping[str, Any]) -> TemplateTagInfo:
    """The `POST /templates/tags` answer."""
    try:
        return TemplateTagInfo(build_id=str(body["buildID"]), tags=[str(t) for t in body["tags"]])
    except (KeyError, TypeError) as exc:
        raise _missing("assign tags", exc) from None


def tags_from_json(body: Any) -> list[TemplateTag]:
    """The `GET /templates/{id}/tags` answer."""
    try:
        return [
            TemplateTag(
                tag=str(item["tag"]), build_id=str(item["buildID"]), created_at=parse_time(item["createdAt"])
            )
            for item in body
        ]
    except (KeyError, TypeError) as exc:
        raise _missing("list tags", exc) from None


def template_info_from_json(body: Mapping[str, Any]) -> TemplateInfo:
    """An item of the `GET /templates` answer."""
    try:
        created = parse_time(str(body["createdAt"]))
        names = body.get("names") or body.get("aliases") or []
        disk = body.get("diskSizeMB")
        return TemplateInfo(
            template_id=str(body["templateID"]),
            build_id=str(body.get("buildID") or ""),
            names=[str(n) for n in names],
            cpu_count=int(body.get("cpuCount") or 0),
            memory_mb=int(body.get("memoryMB") or 0),
            disk_size_mb=int(disk) if disk is not None else None,
            public=bool(body.get("public")),
            created_at=created,
            updated_at=parse_time(str(body["updatedAt"])) if body.get("updatedAt") else created,
            build_status=str(body.get("buildStatus") or "ready"),
            envd_version=str(body["envdVersion"]) if body.get("envdVersion") else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise _missing("template list", exc) from None


# Failures of the build calls are build failures, except what says something else to do
# (credentials, rate limits, an older server, a timeout).
_KEEP = frozenset(
    {"unauthenticated", "resource_exhausted", "unimplemented", "deadline_exceeded", "unavailable", "canceled"}
)
_AS_BUILD: dict[str, type[SandboxException]] = {
    code: BuildException
    for code in (
        "unknown",
        "invalid_argument",
        "not_found",
        "already_exists",
        "permission_denied",
        "failed_precondition",
        "aborted",
        "out_of_range",
        "internal",
        "data_loss",
    )
}
assert not _KEEP & set(_AS_BUILD)


def build_error(status: int, body: bytes, what: str, *, upload: bool = False) -> SandboxException:
    """An error answer of a build call as `BuildException` (`FileUploadException` for uploads)."""
    overrides = {code: FileUploadException for code in _AS_BUILD} if upload else _AS_BUILD
    return error_from_body(status, body, overrides=overrides, context=what)

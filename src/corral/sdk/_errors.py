"""The SDK's exceptions and the one table that maps wire errors onto them.

    SandboxException                        anything the SDK raises on purpose
     ├── TimeoutException                   deadline_exceeded, canceled, unavailable; sandbox gone
     ├── NotFoundException                  not_found
     │    ├── SandboxNotFoundException      no such sandbox (control plane 404)
     │    └── FileNotFoundException         no such file or directory (envd)
     ├── AuthenticationException            unauthenticated (bad API key, access token, user)
     │    └── GitAuthException              git refused the credentials
     ├── PermissionDeniedException          permission_denied
     ├── InvalidArgumentException           invalid_argument, failed_precondition, out_of_range
     ├── AlreadyExistsException             already_exists, aborted
     ├── RateLimitException                 resource_exhausted
     ├── NotSupportedException              unimplemented (the server lacks the feature)
     ├── ConnectionException                the server could not be reached at all
     ├── GitUpstreamException               a branch has no upstream to push to / pull from
     └── CommandExitException               a command exited non-zero (also a CommandResult)

Wire errors carry a Connect code (envd RPCs: `{"code": "not_found", ...}`) or an HTTP status
(REST API and plain HTTP: `{"code": 404, "message": ...}`). Statuses become codes through
`corral.core.errors.CODES` (the one code ↔ status table shared with the server); codes become
exceptions through `EXCEPTION_FOR_CODE` below. Call sites pick a more specific class for
`not_found` (`SandboxNotFoundException`, `FileNotFoundException`) and add what to do next.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from corral.core.errors import CODES

__all__ = [
    "EXCEPTION_FOR_CODE",
    "AlreadyExistsException",
    "AuthenticationException",
    "CommandExitException",
    "CommandResult",
    "ConnectionException",
    "FileNotFoundException",
    "GitAuthException",
    "GitUpstreamException",
    "InvalidArgumentException",
    "NotFoundException",
    "NotSupportedException",
    "PermissionDeniedException",
    "RateLimitException",
    "SandboxException",
    "SandboxNotFoundException",
    "TimeoutException",
    "code_for_status",
    "error_from_body",
    "exception_for",
]


class SandboxException(Exception):
    """Base of every error the SDK raises on purpose.

    `code` is the Connect code of the wire error (`"not_found"`, ...) when there was one.
    """

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def __str__(self) -> str:
        return self.message


class TimeoutException(SandboxException):
    """A deadline passed: the request's, the command's (`timeout=`) or the sandbox's own lifetime."""


class NotFoundException(SandboxException):
    """The thing asked for does not exist (a process, a sandbox, a file...)."""


class SandboxNotFoundException(NotFoundException):
    """No live sandbox has this id (it never existed, was killed, or timed out)."""


class FileNotFoundException(NotFoundException):
    """No file or directory at this path in the sandbox."""


class AuthenticationException(SandboxException):
    """The server did not accept the credentials (API key, envd access token or user name)."""


class GitAuthException(AuthenticationException):
    """The git remote refused the credentials (or needed some and got none)."""


class PermissionDeniedException(SandboxException):
    """The caller is known but not allowed to do this."""


class InvalidArgumentException(SandboxException):
    """An argument was rejected, by the SDK or the server."""


class AlreadyExistsException(SandboxException):
    """The thing to create exists already, or the state forbids the change (e.g. already paused)."""


class RateLimitException(SandboxException):
    """The server is out of a resource (rate, quota, space); retry later or ask for less."""


class NotSupportedException(SandboxException):
    """The server does not implement this yet (HTTP 501 / Connect `unimplemented`)."""


class ConnectionException(SandboxException):
    """The server could not be reached (refused, DNS, TLS, dropped before answering)."""


class GitUpstreamException(SandboxException):
    """The branch has no upstream; pass `remote` and `branch` or set one with `git push -u`."""


@dataclasses.dataclass
class CommandResult:
    """What a finished command left behind."""

    stdout: str
    """Everything the command wrote to stdout (decoded as UTF-8, bad bytes replaced)."""
    stderr: str
    """Everything the command wrote to stderr."""
    exit_code: int
    """Exit code; `-1` when a signal ended the command."""
    error: str | None = None
    """envd's description of a failure (`"exit status 1"`, `"signal: killed"`), else None."""


@dataclasses.dataclass(eq=False)
class CommandExitException(SandboxException, CommandResult):
    """A command exited with a non-zero code. Its output is kept on the exception."""

    def __post_init__(self) -> None:
        SandboxException.__init__(self, self._describe())

    def _describe(self) -> str:
        detail = self.stderr.strip() or self.error or ""
        tail = f": {detail[-2000:]}" if detail else ""
        return f"command exited with code {self.exit_code}{tail}"

    def __str__(self) -> str:
        return self._describe()


# Connect code -> SDK exception. The one table; HTTP statuses map to codes through CODES.
EXCEPTION_FOR_CODE: dict[str, type[SandboxException]] = {
    "canceled": TimeoutException,
    "unknown": SandboxException,
    "invalid_argument": InvalidArgumentException,
    "deadline_exceeded": TimeoutException,
    "not_found": NotFoundException,
    "already_exists": AlreadyExistsException,
    "permission_denied": PermissionDeniedException,
    "resource_exhausted": RateLimitException,
    "failed_precondition": InvalidArgumentException,
    "aborted": AlreadyExistsException,
    "out_of_range": InvalidArgumentException,
    "unimplemented": NotSupportedException,
    "internal": SandboxException,
    "unavailable": TimeoutException,
    "data_loss": SandboxException,
    "unauthenticated": AuthenticationException,
}
assert set(EXCEPTION_FOR_CODE) == set(CODES), "every Connect code needs an SDK exception"

# Status -> code: the first code CODES lists for a status is the canonical one (400 is
# invalid_argument, 409 already_exists, 500 unknown). Connect's HTTP-to-code rules add the
# statuses no code owns (connectrpc.com/docs/protocol#http-to-error-code).
_STATUS_TO_CODE: dict[int, str] = {}
for _code, _status in CODES.items():
    _STATUS_TO_CODE.setdefault(_status, _code)
_STATUS_TO_CODE.update(
    {413: "resource_exhausted", 502: "unavailable", 505: "unimplemented", 507: "resource_exhausted"}
)

# How Corral's API words a 404 for a route it does not have (server/api/_errors.py).
_UNKNOWN_ROUTE = "is not an endpoint of this API"

# What to do next, per code, where there is something useful to say.
_HINTS: dict[str, str] = {
    "unauthenticated": "check the API key (CORRAL_API_KEY or api_key=) and the user name",
    "deadline_exceeded": "pass a larger timeout= or request_timeout= (0 disables it)",
    "unavailable": "the sandbox is gone or timed out; create a new one or extend it with set_timeout()",
    "resource_exhausted": "retry later or ask for less",
    "unimplemented": "this Corral server does not support it yet",
}


def code_for_status(status: int) -> str:
    """The Connect code for an HTTP status (`unknown` for anything unmapped)."""
    return _STATUS_TO_CODE.get(status, "unknown")


def exception_for(
    code: str,
    message: str,
    *,
    overrides: Mapping[str, type[SandboxException]] | None = None,
    hint: bool = True,
) -> SandboxException:
    """The SDK exception for a Connect `code`; `overrides` picks narrower classes per call site."""
    cls = (overrides or {}).get(code) or EXCEPTION_FOR_CODE.get(code, SandboxException)
    text = message or code.replace("_", " ")
    if hint and code in _HINTS and _HINTS[code] not in text and "not supported" not in text:
        text = f"{text} ({_HINTS[code]})"
    return cls(text, code=code)


def error_from_body(
    status: int,
    body: bytes,
    *,
    overrides: Mapping[str, type[SandboxException]] | None = None,
    context: str = "",
) -> SandboxException:
    """Map an error response (`{"code": <int|str>, "message": ...}` or any text) to an exception.

    `context` names what was being done ("kill sandbox abc") and leads the message.
    """
    message = ""
    code = code_for_status(status)
    try:
        payload: Any = json.loads(body) if body else None
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        raw_code = payload.get("code")
        if isinstance(raw_code, str) and raw_code in CODES:
            code = raw_code
        message = str(payload.get("message") or "")
    if not message:
        message = body.decode("utf-8", "replace").strip()[:500] or f"HTTP {status}"
    if (status == 404 and _UNKNOWN_ROUTE in message) or status == 405:
        code = "unimplemented"  # the route itself is missing: an older or partial server
    if context:
        message = f"{context}: {message}"
    return exception_for(code, message, overrides=overrides)

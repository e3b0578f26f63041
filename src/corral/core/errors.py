"""Errors shared by server, node and SDK, named after Connect codes.

    CorralError (code=UNKNOWN)
     ├── InvalidArgument      400  invalid_argument
     ├── FailedPrecondition   400  failed_precondition
     ├── Unauthenticated      401  unauthenticated
     ├── PermissionDenied     403  permission_denied
     ├── NotFound             404  not_found
     ├── AlreadyExists        409  already_exists
     ├── Aborted              409  aborted
     ├── ResourceExhausted    429  resource_exhausted
     ├── Canceled             499  canceled
     ├── Internal             500  internal
     ├── Unimplemented        501  unimplemented
     ├── Unavailable          503  unavailable
     └── DeadlineExceeded     504  deadline_exceeded

`CODES` is the one table from Connect code to HTTP status; everything else derives from it.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "CODES",
    "Aborted",
    "AlreadyExists",
    "Canceled",
    "CorralError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "http_status_for",
]

# Connect code -> HTTP status (connectrpc.com/docs/protocol#error-codes).
CODES: dict[str, int] = {
    "canceled": 499,
    "unknown": 500,
    "invalid_argument": 400,
    "deadline_exceeded": 504,
    "not_found": 404,
    "already_exists": 409,
    "permission_denied": 403,
    "resource_exhausted": 429,
    "failed_precondition": 400,
    "aborted": 409,
    "out_of_range": 400,
    "unimplemented": 501,
    "internal": 500,
    "unavailable": 503,
    "data_loss": 500,
    "unauthenticated": 401,
}


class CorralError(Exception):
    """Base of all errors Corral raises on purpose. `code` is a Connect code."""

    code: ClassVar[str] = "unknown"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def http_status(self) -> int:
        return CODES[self.code]


class InvalidArgument(CorralError):
    code = "invalid_argument"


class FailedPrecondition(CorralError):
    code = "failed_precondition"


class Unauthenticated(CorralError):
    code = "unauthenticated"


class PermissionDenied(CorralError):
    code = "permission_denied"


class NotFound(CorralError):
    code = "not_found"


class AlreadyExists(CorralError):
    code = "already_exists"


class Aborted(CorralError):
    code = "aborted"


class ResourceExhausted(CorralError):
    code = "resource_exhausted"


class Canceled(CorralError):
    code = "canceled"


class Internal(CorralError):
    code = "internal"


class Unimplemented(CorralError):
    code = "unimplemented"


class Unavailable(CorralError):
    code = "unavailable"


class DeadlineExceeded(CorralError):
    code = "deadline_exceeded"


def http_status_for(code: str) -> int:
    return CODES.get(code, 500)

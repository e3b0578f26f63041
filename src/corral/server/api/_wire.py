"""Store rows → E2B response JSON (`Sandbox`, `ListedSandbox`, `SandboxDetail`; e2b-protocol.md §2.1).

Keys are camelCase as E2B's OpenAPI spec names them; times are RFC 3339 in UTC with microseconds
and a `Z` (the SDK parses them with `dateutil.isoparse`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from corral.core.errors import Internal
from corral.core.sandbox import SandboxState
from corral.server.store import SandboxRow

__all__ = ["listed_sandbox_json", "rfc3339", "sandbox_detail_json", "sandbox_json"]

# The SDK's SandboxState knows only these two. A creating sandbox is on its way to running.
_WIRE_STATE = {
    SandboxState.CREATING: "running",
    SandboxState.RUNNING: "running",
    SandboxState.PAUSED: "paused",
}


def rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _wire_state(row: SandboxRow) -> str:
    try:
        return _WIRE_STATE[row.state]
    except KeyError:
        raise Internal(f'sandbox "{row.sandbox_id}" is {row.state.value} and cannot be shown') from None


def sandbox_json(row: SandboxRow, domain: str | None) -> dict[str, Any]:
    """`Sandbox`: the answer to create and connect."""
    body: dict[str, Any] = {
        "templateID": row.template_id,
        "sandboxID": row.sandbox_id,
        "clientID": row.client_id,
        "envdVersion": row.envd_version,
        "trafficAccessToken": None,
        "domain": domain or None,
    }
    if row.alias is not None:
        body["alias"] = row.alias
    if row.secure and row.envd_access_token:
        body["envdAccessToken"] = row.envd_access_token
    return body


def listed_sandbox_json(row: SandboxRow) -> dict[str, Any]:
    """`ListedSandbox`: one item of `GET /v2/sandboxes`."""
    body: dict[str, Any] = {
        "templateID": row.template_id,
        "sandboxID": row.sandbox_id,
        "clientID": row.client_id,
        "startedAt": rfc3339(row.started_at),
        "endAt": rfc3339(row.end_at),
        "cpuCount": row.cpu_count,
        "memoryMB": row.memory_mb,
        "diskSizeMB": row.disk_size_mb,
        "state": _wire_state(row),
        "envdVersion": row.envd_version,
        "metadata": dict(row.metadata),
    }
    if row.alias is not None:
        body["alias"] = row.alias
    return body


def sandbox_detail_json(row: SandboxRow, domain: str | None) -> dict[str, Any]:
    """`SandboxDetail`: the answer to `GET /sandboxes/{id}`."""
    body = listed_sandbox_json(row)
    body["allowInternetAccess"] = row.allow_internet_access
    body["domain"] = domain or None
    body["lifecycle"] = {"autoResume": False, "onTimeout": "pause" if row.auto_pause else "kill"}
    if row.secure and row.envd_access_token:
        body["envdAccessToken"] = row.envd_access_token
    return body

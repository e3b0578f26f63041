"""Store rows → E2B response JSON (`Sandbox`, `ListedSandbox`, `SandboxDetail`; e2b-protocol.md §2.1).

Keys are camelCase as E2B's OpenAPI spec names them; times are RFC 3339 in UTC with microseconds
and a `Z` (the SDK parses them with `dateutil.isoparse`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from corral.core.errors import CorralError, Internal
from corral.core.sandbox import SandboxState
from corral.server.store import LogRow, MetricRow, SandboxRow

__all__ = [
    "fork_result_json",
    "listed_sandbox_json",
    "log_json",
    "metric_json",
    "rfc3339",
    "sandbox_detail_json",
    "sandbox_json",
    "snapshot_json",
]

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


def sandbox_json(row: SandboxRow, domain: str | None, *, traffic_access_token: str | None = None) -> dict[str, Any]:
    """`Sandbox`: the answer to create and connect. `traffic_access_token`: see server.network_policy."""
    body: dict[str, Any] = {
        "templateID": row.template_id,
        "sandboxID": row.sandbox_id,
        "clientID": row.client_id,
        "envdVersion": row.envd_version,
        "trafficAccessToken": traffic_access_token,
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


def sandbox_detail_json(row: SandboxRow, domain: str | None, *, network: Any = None) -> dict[str, Any]:
    """`SandboxDetail`: the answer to `GET /sandboxes/{id}`. `network`: the sandbox's
    `SandboxNetworkConfig`, when it was created with one (see server.network_policy)."""
    body = listed_sandbox_json(row)
    if network is not None:
        body["network"] = network
    body["allowInternetAccess"] = row.allow_internet_access
    body["domain"] = domain or None
    body["lifecycle"] = {"autoResume": row.auto_resume, "onTimeout": "pause" if row.auto_pause else "kill"}
    if row.secure and row.envd_access_token:
        body["envdAccessToken"] = row.envd_access_token
    return body


def snapshot_json(snapshot_id: str, names: list[str]) -> dict[str, Any]:
    """`SnapshotInfo`: the answer to a snapshot request and one item of `GET /snapshots`."""
    return {"snapshotID": snapshot_id, "names": list(names)}


def fork_result_json(
    result: SandboxRow | CorralError, domain: str | None, *, traffic_access_token: str | None = None
) -> dict[str, Any]:
    """One item of `POST /sandboxes/{id}/fork`: `{"sandbox": Sandbox}` or `{"error": Error}`."""
    if isinstance(result, CorralError):
        return {"error": {"code": result.http_status, "message": result.message}}
    return {"sandbox": sandbox_json(result, domain, traffic_access_token=traffic_access_token)}


def metric_json(row: MetricRow) -> dict[str, Any]:
    """`SandboxMetric`: one sample (bytes, percent)."""
    return {
        "timestamp": rfc3339(row.ts),
        "timestampUnix": int(row.ts.timestamp()),
        "cpuCount": row.cpu_count,
        "cpuUsedPct": row.cpu_used_pct,
        "memUsed": row.mem_used,
        "memTotal": row.mem_total,
        "memCache": row.mem_cache,
        "diskUsed": row.disk_used,
        "diskTotal": row.disk_total,
    }


def log_json(row: LogRow) -> dict[str, Any]:
    """`SandboxLogEntry` of `GET /v2/sandboxes/{id}/logs`."""
    return {"timestamp": rfc3339(row.ts), "message": row.message, "level": row.level, "fields": {}}

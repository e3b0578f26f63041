"""Control-plane requests as data, and the sandbox-side URLs and headers. No I/O.

The REST wire is E2B's (e2b-protocol.md §2.1); envd traffic goes to the sandbox URL with the
`E2b-Sandbox-Id` / `E2b-Sandbox-Port` headers and the sandbox's access token (§1.3, §1.6).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any, Final, Literal

from corral.sdk._config import ConnectionConfig
from corral.sdk._errors import InvalidArgumentException
from corral.sdk._models import SandboxLifecycle, SandboxNetworkOpts, SandboxQuery

__all__ = [
    "ENVD_PORT",
    "SDK_USER_AGENT",
    "ApiRequest",
    "SandboxHandle",
    "api_headers",
    "basic_user_header",
    "create_request",
    "file_url",
    "get_signature",
    "list_request",
    "metrics_request",
    "sandbox_path",
]

ENVD_PORT: Final = 49983
SDK_USER_AGENT: Final = "corral-python-sdk/0.1.0"


@dataclasses.dataclass(frozen=True, slots=True)
class ApiRequest:
    """One REST call: `method path?params` with an optional JSON body."""

    method: str
    path: str
    json: Any = None
    params: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class SandboxHandle:
    """What a client needs to talk to one sandbox (from the create/connect answer)."""

    sandbox_id: str
    envd_version: str
    envd_access_token: str | None
    traffic_access_token: str | None
    domain: str | None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> SandboxHandle:
        """The `Sandbox` JSON of `POST /sandboxes` and `POST /sandboxes/{id}/connect`."""
        try:
            sandbox_id = body["sandboxID"]
            envd_version = str(body["envdVersion"])
        except (KeyError, TypeError) as exc:
            raise InvalidArgumentException(f"the server's sandbox answer lacks {exc}") from None

        def text(key: str) -> str | None:
            value = body.get(key)
            return value if isinstance(value, str) and value else None

        return cls(
            sandbox_id=sandbox_id,
            envd_version=envd_version,
            envd_access_token=text("envdAccessToken"),
            traffic_access_token=text("trafficAccessToken"),
            domain=text("domain"),
        )


def api_headers(config: ConnectionConfig) -> dict[str, str]:
    """Headers of every control-plane request."""
    headers = {"user-agent": SDK_USER_AGENT, **dict(config.headers)}
    if config.api_key:
        headers["x-api-key"] = config.api_key
    return headers


def sandbox_path(sandbox_id: str, suffix: str = "") -> str:
    """`/sandboxes/{id}{suffix}` with the id percent-encoded as one path segment."""
    if not sandbox_id:
        raise InvalidArgumentException("a sandbox id is required")
    return f"/sandboxes/{urllib.parse.quote(sandbox_id, safe='')}{suffix}"


def _lifecycle_fields(lifecycle: SandboxLifecycle | None) -> dict[str, Any]:
    if not lifecycle:
        return {}
    on_timeout = lifecycle.get("on_timeout")
    if on_timeout not in (None, "kill", "pause"):
        raise InvalidArgumentException(f"lifecycle on_timeout must be 'kill' or 'pause', got {on_timeout!r}")
    auto_resume = lifecycle.get("auto_resume")
    keep_memory = lifecycle.get("keep_memory")
    if auto_resume and on_timeout != "pause":
        raise InvalidArgumentException("lifecycle auto_resume=True needs on_timeout='pause'")
    if keep_memory is not None and on_timeout != "pause":
        raise InvalidArgumentException("lifecycle keep_memory is only allowed with on_timeout='pause'")
    if keep_memory is False and auto_resume:
        raise InvalidArgumentException("lifecycle auto_resume=True cannot be combined with keep_memory=False")
    fields: dict[str, Any] = {}
    if on_timeout is not None:
        fields["autoPause"] = on_timeout == "pause"
    if keep_memory is not None:
        fields["autoPauseMemory"] = keep_memory
    if auto_resume is not None:
        fields["autoResume"] = {"enabled": auto_resume}
    return fields


_NETWORK_KEYS = {
    "allow_out": "allowOut",
    "deny_out": "denyOut",
    "allow_public_traffic": "allowPublicTraffic",
    "mask_request_host": "maskRequestHost",
}


def _network_body(network: SandboxNetworkOpts | None) -> dict[str, Any] | None:
    if network is None:
        return None
    unknown = set(network) - set(_NETWORK_KEYS)
    if unknown:
        raise InvalidArgumentException(
            f"unknown network options {sorted(unknown)}; known: {sorted(_NETWORK_KEYS)}"
        )
    return {_NETWORK_KEYS[key]: value for key, value in network.items()}


def create_request(
    *,
    template: str,
    timeout: int,
    metadata: Mapping[str, str] | None,
    envs: Mapping[str, str] | None,
    secure: bool,
    allow_internet_access: bool,
    network: SandboxNetworkOpts | None,
    lifecycle: SandboxLifecycle | None,
    volume_mounts: Mapping[str, str] | None,
) -> ApiRequest:
    """`POST /sandboxes`, with the body the official SDK sends."""
    if not template:
        raise InvalidArgumentException("template must be a template name or id, e.g. 'base'")
    if timeout < 0:
        raise InvalidArgumentException(f"timeout must be >= 0 seconds, got {timeout}")
    body: dict[str, Any] = {
        "templateID": template,
        "timeout": int(timeout),
        "secure": secure,
        "allow_internet_access": allow_internet_access,
        "metadata": dict(metadata or {}),
        "envVars": dict(envs or {}),
        **_lifecycle_fields(lifecycle),
    }
    network_body = _network_body(network)
    if network_body is not None:
        body["network"] = network_body
    if volume_mounts:
        body["volumeMounts"] = [{"name": name, "path": path} for path, name in volume_mounts.items()]
    return ApiRequest("POST", "/sandboxes", json=body)


def _rfc3339(value: Any) -> str:
    if value.tzinfo is None:
        value = value.astimezone()  # naive means local time, as E2B's SDK reads it
    return str(value.isoformat())


def list_request(
    query: SandboxQuery | None,
    limit: int | None,
    next_token: str | None,
    order: Literal["asc", "desc"] | None,
) -> ApiRequest:
    """`GET /v2/sandboxes` with the filters encoded as the server expects (§2.1)."""
    params: list[tuple[str, str]] = []
    if query is not None:
        if query.metadata:
            quoted = {urllib.parse.quote(k): urllib.parse.quote(v) for k, v in query.metadata.items()}
            params.append(("metadata", urllib.parse.urlencode(quoted)))
        if query.state:
            params.append(("state", ",".join(str(state) for state in query.state)))
        if query.started_after is not None:
            params.append(("startedAfter", _rfc3339(query.started_after)))
        if query.template:
            params.append(("template", query.template))
    if order is not None:
        if order not in ("asc", "desc"):
            raise InvalidArgumentException(f"order must be 'asc' or 'desc', got {order!r}")
        params.append(("order", order))
    if limit:
        if limit < 1:
            raise InvalidArgumentException(f"limit must be at least 1, got {limit}")
        params.append(("limit", str(limit)))
    if next_token:
        params.append(("nextToken", next_token))
    return ApiRequest("GET", "/v2/sandboxes", params=tuple(params))


def metrics_request(sandbox_id: str, start: Any = None, end: Any = None) -> ApiRequest:
    """`GET /sandboxes/{id}/metrics?start=&end=` (unix seconds, only when given)."""
    params = []
    if start is not None:
        params.append(("start", str(int(start.timestamp()))))
    if end is not None:
        params.append(("end", str(int(end.timestamp()))))
    return ApiRequest("GET", sandbox_path(sandbox_id, "/metrics"), params=tuple(params))


def basic_user_header(user: str | None) -> dict[str, str]:
    """envd picks the acting user from `Authorization: Basic base64("<user>:")`; none = default user."""
    if not user:
        return {}
    return {"authorization": "Basic " + base64.b64encode(f"{user}:".encode()).decode()}


def get_signature(
    path: str,
    operation: Literal["read", "write"],
    user: str | None,
    access_token: str,
    expiration_in_seconds: int | None = None,
) -> tuple[str, int | None]:
    """The v1 signature of a header-less `/files` URL and its expiry (unix seconds) (§3.4)."""
    expiration = int(time.time()) + expiration_in_seconds if expiration_in_seconds is not None else None
    raw = f"{path}:{operation}:{user or ''}:{access_token}"
    if expiration is not None:
        raw += f":{expiration}"
    digest = hashlib.sha256(raw.encode()).digest()
    return "v1_" + base64.b64encode(digest).rstrip(b"=").decode("ascii"), expiration


def file_url(
    envd_url: str,
    path: str,
    operation: Literal["read", "write"],
    *,
    user: str | None,
    access_token: str | None,
    expiration_in_seconds: int | None,
) -> str:
    """`{envd}/files?path=&username=&signature=&signature_expiration=`, signed when secured."""
    if access_token is None and expiration_in_seconds is not None:
        raise InvalidArgumentException(
            "signature expiration needs a secured sandbox (created with secure=True)"
        )
    query = {"path": path} if path else {}
    if user:
        query["username"] = user
    if access_token is not None:
        signature, expiration = get_signature(path, operation, user, access_token, expiration_in_seconds)
        query["signature"] = signature
        if expiration is not None:
            query["signature_expiration"] = str(expiration)
    return f"{envd_url}/files?{urllib.parse.urlencode(query, quote_via=urllib.parse.quote)}"

"""The typed commands the REST handlers produce and the service interface they call.

`SandboxServiceProtocol` is implemented by `corral.server.service` (the business logic); the API
never does more than parse a request into these types, call one method and serialise the result.

Errors the service raises (`corral.core.errors`) become HTTP responses through one table: NotFound
→ 404 `{"code":404,"message":"sandbox \\"<id>\\" not found"}`, AlreadyExists/Aborted → 409 (pause of
an already paused sandbox; the SDK turns 409 into `False`), Unimplemented → 501, and so on.
"""

from __future__ import annotations

import builtins
from typing import Any, Protocol

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from corral.server.network_policy import NetworkPolicies
from corral.server.query import SandboxQuery
from corral.server.store import LogRow, MetricRow, SandboxRow, SnapshotRow

__all__ = ["MAX_TIMEOUT_SECONDS", "CreateSandboxRequest", "SandboxServiceProtocol"]

# `timeout` is an int32 in E2B's OpenAPI spec; anything larger would overflow a datetime anyway.
MAX_TIMEOUT_SECONDS = 2**31 - 1


class CreateSandboxRequest(BaseModel):
    """Body of `POST /sandboxes` (E2B `NewSandbox`). Unknown keys are ignored, as E2B does.

    `network`, `lifecycle`, `auto_resume`, `volume_mounts`, `mcp` and `iam` are accepted and kept
    as raw JSON for features that come later.
    """

    model_config = ConfigDict(frozen=True, extra="ignore", validate_by_name=True, validate_by_alias=True)

    template_id: str = Field("base", alias="templateID", min_length=1, max_length=255)
    timeout: int = Field(300, ge=0, le=MAX_TIMEOUT_SECONDS)  # seconds until the sandbox ends
    metadata: dict[str, str] = Field(default_factory=dict)
    env_vars: dict[str, str] = Field(default_factory=dict, alias="envVars")
    secure: bool = True
    # The Python SDK sends this key in snake_case (e2b-protocol.md §2.1); accept camelCase too.
    allow_internet_access: bool = Field(
        True, validation_alias=AliasChoices("allow_internet_access", "allowInternetAccess")
    )
    auto_pause: bool = Field(False, alias="autoPause")
    auto_pause_memory: bool = Field(True, alias="autoPauseMemory")
    auto_resume: dict[str, Any] | None = Field(None, alias="autoResume")
    network: dict[str, Any] | None = None
    lifecycle: dict[str, Any] | None = None
    volume_mounts: list[dict[str, Any]] | None = Field(None, alias="volumeMounts")
    mcp: dict[str, Any] | None = None
    iam: dict[str, Any] | None = None

    @field_validator("metadata", "env_vars", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value


class SandboxServiceProtocol(Protocol):
    """What the REST API needs from the sandbox service. Every method is scoped to one team."""

    network_policies: NetworkPolicies  # `network` config, traffic tokens, PUT /sandboxes/{id}/network

    async def create(self, team_id: str, req: CreateSandboxRequest) -> SandboxRow:
        """Create and start a sandbox; return it once it is running."""
        ...

    async def get(self, team_id: str, sandbox_id: str) -> SandboxRow:
        """The live sandbox (running or paused); NotFound otherwise."""
        ...

    async def kill(self, team_id: str, sandbox_id: str) -> None:
        """Kill a running or paused sandbox; NotFound when there is no such live sandbox."""
        ...

    async def set_timeout(self, team_id: str, sandbox_id: str, seconds: int) -> None:
        """Set `end_at = now + seconds` (may shorten; 0 expires now); NotFound."""
        ...

    async def connect(self, team_id: str, sandbox_id: str, timeout: int) -> tuple[SandboxRow, bool]:
        """Extend a running sandbox (never shorten) or resume a paused one; `(row, resumed)`."""
        ...

    async def pause(self, team_id: str, sandbox_id: str, keep_memory: bool) -> None:
        """Pause; NotFound, or AlreadyExists/Aborted (409) when already paused, Unimplemented (501)."""
        ...

    async def create_snapshot(self, team_id: str, sandbox_id: str, name: str | None) -> tuple[str, builtins.list[str]]:
        """Snapshot a sandbox's files as a template; `(snapshot id, names)`."""
        ...

    async def list_snapshots(
        self, team_id: str, *, sandbox_id: str | None, name: str | None, limit: int, next_token: str | None
    ) -> tuple[builtins.list[SnapshotRow], str | None]:
        """One page of the team's snapshots (newest first) and the next-page token."""
        ...

    async def delete_snapshot(self, team_id: str, snapshot_id: str) -> None:
        """Delete a snapshot (`DELETE /templates/{id}`); NotFound when there is none."""
        ...

    async def fork(self, team_id: str, sandbox_id: str, timeout: int, count: int) -> builtins.list[Any]:
        """New sandboxes with copies of the sandbox's files: per fork a `SandboxRow` or a `CorralError`."""
        ...

    async def metrics(self, team_id: str, sandbox_id: str, start: int | None, end: int | None) -> builtins.list[MetricRow]:
        """Samples with start <= timestamp <= end (unix seconds), oldest first."""
        ...

    async def logs(
        self,
        team_id: str,
        sandbox_id: str,
        *,
        cursor_ms: int | None,
        limit: int,
        forward: bool,
        level: str | None,
        search: str | None,
    ) -> builtins.list[LogRow]:
        """The sandbox's log lines from (forward) or up to (backward) `cursor_ms`."""
        ...

    # Last, so that `list` below names the builtin in the annotations above under every type checker.
    async def list(self, team_id: str, query: SandboxQuery) -> tuple[builtins.list[SandboxRow], str | None]:
        """One page of the team's sandboxes and the next-page token (None on the last page)."""
        ...

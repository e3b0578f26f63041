"""Plain values the store hands out (ORM objects never leave the store)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import datetime

from corral.core.sandbox import ENVD_VERSION, SandboxState

__all__ = ["SANDBOX_COLUMNS", "UPDATABLE_COLUMNS", "SandboxRow"]


@dataclasses.dataclass(frozen=True, slots=True)
class SandboxRow:
    """One sandbox as recorded by the control plane. Timestamps are timezone-aware UTC."""

    sandbox_id: str
    team_id: str
    template_id: str
    state: SandboxState
    started_at: datetime
    end_at: datetime  # when the sandbox times out (killed, or paused when auto_pause)
    alias: str | None = None  # template name the sandbox was created from, if any
    client_id: str = "corral"  # E2B's `clientID`: any string; the SDK only requires that it exists
    cpu_count: int = 2
    memory_mb: int = 512
    disk_size_mb: int = 2048
    envd_access_token: str | None = None  # X-Access-Token envd requires (secure sandboxes)
    envd_version: str = ENVD_VERSION
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    env_vars: Mapping[str, str] = dataclasses.field(default_factory=dict)
    allow_internet_access: bool = True
    secure: bool = True
    auto_pause: bool = False
    ip: str | None = None
    node_id: str | None = None
    killed_at: datetime | None = None
    kill_reason: str | None = None


SANDBOX_COLUMNS: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(SandboxRow))
# The key and the owner never change; `state=killed` goes through `Store.mark_killed`.
UPDATABLE_COLUMNS: frozenset[str] = frozenset(SANDBOX_COLUMNS) - {"sandbox_id", "team_id"}

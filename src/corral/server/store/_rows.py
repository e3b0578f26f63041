"""Plain values the store hands out (ORM objects never leave the store)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import datetime

from corral.core.sandbox import ENVD_VERSION, SandboxState

__all__ = ["SANDBOX_COLUMNS", "UPDATABLE_COLUMNS", "LogRow", "MetricRow", "SandboxRow", "SnapshotRow"]


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
    auto_pause_memory: bool = True  # a timeout-pause keeps memory (freeze) or only files (stop)
    auto_resume: bool = False  # traffic to a paused (frozen) sandbox resumes it
    timeout_s: int = 300  # the sandbox's timeout; an auto-resume runs it this long again
    paused_memory: bool | None = None  # while paused: True = frozen, False = stopped (files only)
    layers: tuple[str, ...] | None = None  # its root filesystem's layer digests, lowest first


@dataclasses.dataclass(frozen=True, slots=True)
class SnapshotRow:
    """A snapshot: the files of a sandbox at one moment, registered as a template `snapshot_id`."""

    snapshot_id: str
    team_id: str
    sandbox_id: str  # the sandbox it was taken of
    name: str | None
    layer: str  # the layer it added on top of the sandbox's layers
    created_at: datetime


@dataclasses.dataclass(frozen=True, slots=True)
class MetricRow:
    """One sample of what a sandbox used (E2B `SandboxMetric`); bytes and percent."""

    sandbox_id: str
    ts: datetime
    cpu_count: int
    cpu_used_pct: float
    mem_used: int
    mem_total: int
    mem_cache: int
    disk_used: int
    disk_total: int


@dataclasses.dataclass(frozen=True, slots=True)
class LogRow:
    """One line of a sandbox's log (lifecycle events the control plane records)."""

    sandbox_id: str
    ts: datetime
    level: str  # debug | info | warn | error
    message: str


SANDBOX_COLUMNS: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(SandboxRow))
# The key and the owner never change; `state=killed` goes through `Store.mark_killed`.
UPDATABLE_COLUMNS: frozenset[str] = frozenset(SANDBOX_COLUMNS) - {"sandbox_id", "team_id"}

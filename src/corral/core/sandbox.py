"""Sandbox domain types: lifecycle states and the spec a node needs to start one."""

from __future__ import annotations

import dataclasses
import enum

__all__ = ["DEFAULT_USER", "ENVD_PORT", "ENVD_VERSION", "SandboxSpec", "SandboxState"]

DEFAULT_USER = "user"
ENVD_PORT = 49983
# The envd protocol version we answer to; the official SDK gates features on it (e2b-protocol.md §3.1).
ENVD_VERSION = "0.6.13"


class SandboxState(enum.StrEnum):
    """Lifecycle of a sandbox. Legal transitions: creating→running→(paused⇄running)→killed."""

    CREATING = "creating"  # resources being set up; not visible in lists
    RUNNING = "running"  # container running, envd reachable
    PAUSED = "paused"  # frozen (memory kept) or stopped (filesystem kept)
    KILLED = "killed"  # gone; row kept for a while for audit, never listed


@dataclasses.dataclass(frozen=True, slots=True)
class SandboxSpec:
    """Everything a node needs to start one sandbox. Pure data."""

    sandbox_id: str
    template_id: str
    layers: tuple[str, ...]  # layer digests, lowest first
    cpu_count: int = 2
    memory_mb: int = 512
    disk_size_mb: int = 2048
    pids_limit: int = 4096
    env_vars: tuple[tuple[str, str], ...] = ()
    allow_internet_access: bool = True
    access_token: str | None = None
    runtime: str = ""  # OCI runtime name (a template's choice); "" = the template's, else the server's

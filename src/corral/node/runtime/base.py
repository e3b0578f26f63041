"""The seam between envd and the OCI runtime: start a process inside a running sandbox.

Lifecycle of a `SpawnedProcess`: created by `Spawner.spawn` (already running, pid known) →
output read from `stdout`/`stderr` (or `pty`) until EOF → `wait()` returns the `ExitStatus` once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Protocol

__all__ = ["UserIds", "PtySize", "ExitStatus", "SpawnRequest", "SpawnedProcess", "Spawner"]


@dataclasses.dataclass(frozen=True, slots=True)
class UserIds:
    """A user inside the sandbox, as its /etc/passwd and /etc/group say."""

    name: str
    uid: int
    gid: int
    home: str
    groups: tuple[int, ...] = ()
    shell: str = "/bin/bash"


@dataclasses.dataclass(frozen=True, slots=True)
class PtySize:
    cols: int
    rows: int


@dataclasses.dataclass(frozen=True, slots=True)
class ExitStatus:
    exit_code: int  # -1 when killed by a signal (as Go's ProcessState.ExitCode())
    signal: int | None = None

    @property
    def status(self) -> str:
        """Go's ProcessState.String(): `exit status N` or `signal: killed`."""
        if self.signal is not None:
            return f"signal: {_SIGNAL_NAMES.get(self.signal, f'signal {self.signal}')}"
        return f"exit status {self.exit_code}"


_SIGNAL_NAMES = {9: "killed", 15: "terminated", 2: "interrupt", 1: "hangup", 6: "aborted", 11: "segmentation fault"}


@dataclasses.dataclass(frozen=True, slots=True)
class SpawnRequest:
    argv: Sequence[str]
    env: Mapping[str, str]
    cwd: str
    user: UserIds
    pty: PtySize | None = None  # a real pseudo-terminal (TERM etc. are the caller's business)
    stdin: bool = False  # keep a writable stdin pipe; otherwise stdin is /dev/null


class SpawnedProcess(Protocol):
    pid: int  # pid inside the sandbox's pid namespace
    stdout: object  # asyncio.StreamReader | None
    stderr: object  # asyncio.StreamReader | None

    def write_stdin(self, data: bytes) -> None: ...
    def close_stdin(self) -> None: ...
    def resize(self, size: PtySize) -> None: ...
    def send_signal(self, signum: int) -> None: ...
    async def wait(self) -> ExitStatus: ...


class Spawner(Protocol):
    async def spawn(self, request: SpawnRequest) -> SpawnedProcess: ...

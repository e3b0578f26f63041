"""The seam between envd and the OCI runtime: start a process inside a running sandbox.

Lifecycle of a `SpawnedProcess`: created by `Spawner.spawn` (already running, its sandbox pid
known) → output read from the non-blocking fds of `output_fds()` until EOF (EIO on a pty master)
→ `wait()` returns the `ExitStatus` once the process has exited → `close()` releases the fds.
`send_signal`, `write_input`, `close_stdin` and `resize` may be called at any point before
`close()`; after the process has exited they do nothing (or say so).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Protocol

__all__ = ["MAX_DESCRIPTION", "ExitStatus", "PtySize", "SpawnRequest", "SpawnedProcess", "Spawner", "UserIds"]

# The longest `SpawnRequest.description` a runtime keeps (the exec agent: native/corral-init.c).
MAX_DESCRIPTION = 16 << 10


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


# Go's syscall.Signal.String() on Linux, which envd's status text uses.
_SIGNAL_NAMES = {
    1: "hangup",
    2: "interrupt",
    3: "quit",
    4: "illegal instruction",
    5: "trace/breakpoint trap",
    6: "aborted",
    7: "bus error",
    8: "floating point exception",
    9: "killed",
    10: "user defined signal 1",
    11: "segmentation fault",
    12: "user defined signal 2",
    13: "broken pipe",
    14: "alarm clock",
    15: "terminated",
}


@dataclasses.dataclass(frozen=True, slots=True)
class SpawnRequest:
    argv: Sequence[str]
    env: Mapping[str, str]
    cwd: str
    user: UserIds
    pty: PtySize | None = None  # a real pseudo-terminal (TERM etc. are the caller's business)
    stdin: bool = False  # keep a writable stdin pipe; otherwise stdin is /dev/null
    # Opaque to the runtime: kept with the process where the runtime outlives the server (the exec
    # agent), and handed back to a restarted server with the process (`AgentProcess.description`).
    description: bytes = b""


class SpawnedProcess(Protocol):
    pid: int  # pid inside the sandbox's pid namespace

    def output_fds(self) -> Sequence[tuple[str, int]]:
        """(`stdout`|`stderr`|`pty`, non-blocking fd) pairs to read output from; owned by the process."""
        ...

    async def write_input(self, data: bytes) -> None:
        """Write to stdin (or the terminal); waits while the process does not read. InvalidArgument
        when the process has no input."""
        ...

    def close_stdin(self) -> None: ...

    def resize(self, size: PtySize) -> None: ...

    def send_signal(self, signum: int) -> None:
        """Signal the process and the process group it leads (its pipeline, its children)."""
        ...

    async def wait(self) -> ExitStatus: ...

    def close(self) -> None: ...


class Spawner(Protocol):
    async def spawn(self, request: SpawnRequest) -> SpawnedProcess: ...

"""Start and ready commands: a template's start command runs in the background in every sandbox of
it, and the sandbox is ready once the ready command exits 0 (polled; E2B's semantics).

At build time the finishing phase runs both once to prove they work (`BuildSandbox`, in
`corral.builder.executor`); at create time the control plane calls

    await start_template_processes(handle, manifest)

after the node started the sandbox: the start command becomes an envd process of the sandbox (it
shows up in `commands.list()` and can be killed like any other) run as the template's default user
in its default workdir with its env vars, and the call returns once the ready command passes.
`TemplateNotReady` if the start command exits non-zero first or the ready command does not pass
within `ready_timeout_s`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from corral.builder.sandbox import PATH
from corral.core.errors import FailedPrecondition
from corral.node.envd.process import ManagedProcess, describe_process
from corral.node.envd.users import lookup_user
from corral.node.runtime._fdio import read_chunk
from corral.node.runtime.base import ExitStatus, SpawnRequest
from corral.spec._generated.process import process_pb as pb

__all__ = [
    "READY_RETRY_S",
    "READY_TIMEOUT_S",
    "TemplateNotReady",
    "start_template_processes",
    "wait_until_ready",
]

READY_RETRY_S = 0.5  # E2B waits 2 s between tries; builds and creates are snappier with less
READY_TIMEOUT_S = 600.0  # E2B's limit for a build's ready command
CREATE_READY_TIMEOUT_S = 120.0


class TemplateNotReady(FailedPrecondition):
    """The start command failed or the ready command never passed."""


async def wait_until_ready(
    check_ready: Callable[[], Awaitable[bool]],
    start_status: Callable[[], ExitStatus | None],
    *,
    timeout_s: float,
    retry_s: float = READY_RETRY_S,
) -> None:
    """Poll `check_ready()` until it is True. Fails when `start_status()` reports a non-zero exit
    (a start command that exits 0 — a one-shot setup — is fine) or after `timeout_s` in all (a
    ready command that hangs is cut off)."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                if await check_ready():
                    return
                status = start_status()
                if status is not None and (status.exit_code != 0 or status.signal is not None):
                    raise TemplateNotReady(f"start command failed: {status.status}")
                await asyncio.sleep(retry_s)
    except TimeoutError:
        raise TemplateNotReady(f"ready command timed out after {time.monotonic() - started:.0f}s") from None


async def _drain(fd: int) -> None:
    while await read_chunk(fd):
        pass


async def start_template_processes(
    handle: Any, manifest: Any, *, ready_timeout_s: float = CREATE_READY_TIMEOUT_S
) -> None:
    """Start `manifest.start_cmd` in the sandbox `handle` and wait for `manifest.ready_cmd`.

    Nothing to do for templates without either. `handle` is a `corral.node.sandboxes.SandboxHandle`
    (its `envd` has the spawner, the confined root and the process table)."""
    start_cmd = getattr(manifest, "start_cmd", None)
    ready_cmd = getattr(manifest, "ready_cmd", None)
    if not start_cmd and not ready_cmd:
        return
    envd = handle.envd
    user = lookup_user(envd.root, manifest.default_user)
    cwd = manifest.default_workdir or user.home
    env = {"PATH": PATH, "HOME": user.home, "USER": user.name, "LOGNAME": user.name}
    env.update(manifest.env_vars or {})
    env.update(envd.default_env())

    def request(command: str, description: bytes = b"") -> SpawnRequest:
        argv = ["/bin/bash", "-l", "-c", command]
        return SpawnRequest(argv=argv, env=env, cwd=cwd, user=user, description=description)

    started: ManagedProcess | None = None
    if start_cmd:
        config = pb.ProcessConfig(
            cmd="/bin/bash", args=["-l", "-c", start_cmd], envs=dict(manifest.env_vars or {}), cwd=cwd
        )
        # Described like envd's own starts, so a restarted server lists it again (tag "start").
        proc = await envd.spawner.spawn(request(start_cmd, describe_process(config, "start", False, None)))
        started = ManagedProcess(proc, config, "start", False)
        envd.processes.add(started, None)  # the table pumps (and drops) its output and owns it

    async def check_ready() -> bool:
        if not ready_cmd:
            return True
        probe = await envd.spawner.spawn(request(ready_cmd))
        drains = [asyncio.ensure_future(_drain(fd)) for _, fd in probe.output_fds()]
        status: ExitStatus | None = None
        try:
            status = await probe.wait()
        finally:
            if status is None:  # cut off by the overall timeout
                probe.send_signal(9)
            await asyncio.wait(drains, timeout=1.0)  # background children may hold the pipes
            for drain in drains:
                drain.cancel()
            await asyncio.gather(*drains, return_exceptions=True)
            probe.close()
        return status is not None and status.exit_code == 0

    await wait_until_ready(
        check_ready, lambda: started.status if started is not None else None, timeout_s=ready_timeout_s
    )

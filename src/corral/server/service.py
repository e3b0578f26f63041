"""The sandbox service: what the API's routes call. Business rules live here, not in handlers.

It keeps the database (the record of every sandbox) and the node (the running sandboxes) in step:
a row is written `creating` before any resource exists, becomes `running` once the sandbox is up,
and `killed` after every resource is gone — so a crash at any point is repaired by `reconcile()`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any

from corral.core.errors import Aborted, CorralError, InvalidArgument, NotFound, Unimplemented
from corral.core.ids import new_access_token, new_sandbox_id
from corral.core.sandbox import ENVD_VERSION, SandboxSpec, SandboxState
from corral.core.settings import Settings

__all__ = ["SandboxService"]

log = logging.getLogger(__name__)

MAX_TIMEOUT_S = 24 * 3600


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def spec_from_row(row: Any, layers: tuple[str, ...]) -> SandboxSpec:
    return SandboxSpec(
        sandbox_id=row.sandbox_id,
        template_id=row.template_id,
        layers=layers,
        cpu_count=row.cpu_count,
        memory_mb=row.memory_mb,
        disk_size_mb=row.disk_size_mb,
        env_vars=tuple(sorted((row.env_vars or {}).items())),
        allow_internet_access=row.allow_internet_access,
        access_token=row.envd_access_token if row.secure else None,
    )


class SandboxService:
    def __init__(self, settings: Settings, store: Any, node: Any, templates: Any, row_type: type) -> None:
        self.settings = settings
        self.store = store
        self.node = node
        self.templates = templates
        self._row_type = row_type
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, sandbox_id: str) -> asyncio.Lock:
        return self._locks.setdefault(sandbox_id, asyncio.Lock())

    async def create(self, team_id: str, req: Any) -> Any:
        if req.timeout < 0 or req.timeout > MAX_TIMEOUT_S:
            raise InvalidArgument(f"timeout must be between 0 and {MAX_TIMEOUT_S} seconds, got {req.timeout}")
        template = self.templates.get(req.template_id)
        sandbox_id = new_sandbox_id()
        now = _now()
        row = self._row_type(
            sandbox_id=sandbox_id,
            team_id=team_id,
            template_id=template.template_id,
            alias=template.names[0] if template.names else None,
            client_id="corral",
            state=SandboxState.CREATING,
            started_at=now,
            end_at=now + dt.timedelta(seconds=req.timeout),
            cpu_count=template.cpu_count,
            memory_mb=template.memory_mb,
            disk_size_mb=template.disk_size_mb,
            envd_access_token=new_access_token(),
            envd_version=ENVD_VERSION,
            metadata=dict(req.metadata or {}),
            env_vars=dict(req.env_vars or {}),
            allow_internet_access=req.allow_internet_access,
            secure=req.secure,
            auto_pause=req.auto_pause,
            ip=None,
            node_id="local",
            killed_at=None,
            kill_reason=None,
        )
        self.store.insert_sandbox(row)
        try:
            handle = await self.node.create(spec_from_row(row, template.layers))
        except BaseException as exc:
            self.store.mark_killed(sandbox_id, f"create failed: {exc}")
            raise
        started = _now()
        self.store.update_sandbox(
            sandbox_id,
            state=SandboxState.RUNNING,
            ip=handle.ip,
            started_at=started,
            end_at=started + dt.timedelta(seconds=req.timeout),
        )
        return self._get(sandbox_id, team_id)

    def _get(self, sandbox_id: str, team_id: str | None) -> Any:
        row = self.store.get_sandbox(sandbox_id, team_id)
        if row is None or row.state in (SandboxState.KILLED, SandboxState.CREATING):
            raise NotFound(f'sandbox "{sandbox_id}" not found')
        return row

    async def get(self, team_id: str, sandbox_id: str) -> Any:
        return self._get(sandbox_id, team_id)

    async def list(self, team_id: str, query: Any) -> tuple[list[Any], str | None]:
        return self.store.list_sandboxes(team_id, query)

    async def kill(self, team_id: str, sandbox_id: str, reason: str = "killed by request") -> None:
        self._get(sandbox_id, team_id)
        await self._kill(sandbox_id, reason)

    async def _kill(self, sandbox_id: str, reason: str) -> None:
        async with self._lock(sandbox_id):
            # The record flips first, so the API never shows a sandbox the proxy no longer serves;
            # if we crash before the resources are gone, reconcile removes them as strays.
            self.store.mark_killed(sandbox_id, reason)
            await self.node.destroy(sandbox_id)
        self._locks.pop(sandbox_id, None)

    async def set_timeout(self, team_id: str, sandbox_id: str, seconds: int) -> None:
        if seconds < 0 or seconds > MAX_TIMEOUT_S:
            raise InvalidArgument(f"timeout must be between 0 and {MAX_TIMEOUT_S} seconds, got {seconds}")
        self._get(sandbox_id, team_id)
        self.store.update_sandbox(sandbox_id, end_at=_now() + dt.timedelta(seconds=seconds))
        if seconds == 0:
            await self.expire_due()

    async def connect(self, team_id: str, sandbox_id: str, timeout: int) -> tuple[Any, bool]:
        row = self._get(sandbox_id, team_id)
        if row.state == SandboxState.PAUSED:
            raise Unimplemented("resuming paused sandboxes is not supported yet")
        wanted = _now() + dt.timedelta(seconds=max(0, timeout))
        if wanted > row.end_at:
            self.store.update_sandbox(sandbox_id, end_at=wanted)
        return self._get(sandbox_id, team_id), False

    async def pause(self, team_id: str, sandbox_id: str, keep_memory: bool) -> None:
        row = self._get(sandbox_id, team_id)
        if row.state == SandboxState.PAUSED:
            raise Aborted(f'sandbox "{sandbox_id}" is already paused')
        raise Unimplemented("pausing sandboxes is not supported yet")

    async def expire_due(self) -> None:
        """Kill every running sandbox whose end time has passed."""
        for row in self.store.expired(_now()):
            try:
                await self._kill(row.sandbox_id, "timeout")
            except Exception:  # one bad sandbox must not stop the others from expiring
                log.exception("failed to expire sandbox %s", row.sandbox_id)

    async def run_expiry(self, interval_s: float = 0.25) -> None:
        while True:
            await self.expire_due()
            await asyncio.sleep(interval_s)

    async def reconcile(self) -> tuple[list[str], list[str]]:
        """On start: re-adopt live sandboxes, mark the ones whose container is gone as killed."""
        rows = self.store.live_sandboxes()
        specs = []
        creating = []
        for row in rows:
            if row.state == SandboxState.CREATING:
                creating.append(row.sandbox_id)  # the server died mid-create: never reported as created
                continue
            try:
                layers = self.templates.get(row.template_id).layers
            except CorralError:
                layers = ()
            specs.append(spec_from_row(row, layers))
        adopted, lost = await self.node.reconcile(specs)
        for sandbox_id in lost + creating:
            self.store.mark_killed(sandbox_id, "gone after server restart")
        return adopted, lost + creating



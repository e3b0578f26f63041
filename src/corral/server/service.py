"""The sandbox service: what the API's routes call. Business rules live here, not in handlers.

It keeps the database (the record of every sandbox) and the node (the running sandboxes) in step.
The database is the truth; the node is brought to it:
- create: a row is written `creating` before any resource exists, becomes `running` once the
  sandbox is up, and `killed` after every resource is gone;
- pause: the row becomes `paused` (with `paused_memory`) first, then the node freezes or stops the
  sandbox; resume: the node thaws or cold-boots it first, then the row becomes `running`.
So a crash at any point is repaired by `reconcile()`, which drives each sandbox to its row's state.

Lifecycle rules (docs/lifecycle.md):
- pause with memory = cgroup freezer: processes, memory and files kept, no CPU. Without memory =
  the container stops, files (its own disk) and network stay; resuming cold-boots it with a new
  boot id. Either way envd's access token stays the same.
- A paused sandbox does not time out (E2B keeps paused sandboxes); resuming sets
  `end_at = now + timeout` (connect's timeout, or the sandbox's own for an auto-resume).
- At `end_at` a running sandbox is killed, or paused when it was created with
  `lifecycle.on_timeout = "pause"` (`autoPause`), keeping memory unless `autoPauseMemory` is false.
- With `autoResume`, traffic through the proxy to a frozen sandbox resumes it (the node calls
  `wake`). A stopped (filesystem-only) one must be resumed with connect, as on E2B.
- Snapshots and forks copy the sandbox's writable layer (frozen for the copy) into a new read-only
  layer. A snapshot is a template (`Sandbox.create(snapshot_id)`); forks are new sandboxes on
  top of that layer, cold-booted. Layers they made are deleted once no template or live sandbox
  uses them.
- Layer collection (`collect_layers`) is the one place layers are deleted: owned layers (made by a
  snapshot, a fork, a build step or a registry pull) that no template build, live or tearing-down
  sandbox, snapshot, pinned commit or `layer_holders` entry (the builder: in-flight builds, kept
  build-cache entries) refers to. It decides and renames the doomed layers out of sight in one
  step of the event loop, so nothing can start using one in between; the deletion comes after.
  At start, layers older versions left unowned that nothing refers to are adopted (recorded as
  owned) first, so they are collected too (`adopt_unowned_layers`, `corral.server.layer_adoption`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import logging
import re
import shutil
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from corral.builder.startcmd import start_template_processes
from corral.core.errors import (
    Aborted,
    AlreadyExists,
    CorralError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Unimplemented,
)
from corral.core.ids import new_access_token, new_sandbox_id
from corral.core.sandbox import ENVD_VERSION, SandboxSpec, SandboxState
from corral.core.settings import Settings
from corral.node.sandboxes import NodeStatus
from corral.node.storage.commit import retire_layer
from corral.node.storage.templates import TemplateManifest
from corral.server.layer_adoption import ADOPTED_KIND, ADOPTION_MIN_AGE_S, plan_adoption, scan_layer_dirs
from corral.server.network_policy import NetworkPolicies
from corral.server.scheduler import MetricsSampler, Scheduler
from corral.server.store import SnapshotRow

__all__ = [
    "MAX_FORKS",
    "MAX_METRIC_POINTS",
    "Lifecycle",
    "SandboxService",
    "downsample",
    "lifecycle_of",
    "spec_from_row",
    "validate_snapshot_name",
]

log = logging.getLogger(__name__)

MAX_TIMEOUT_S = 24 * 3600
MAX_FORKS = 20
MAX_METRIC_POINTS = 1000  # a metrics answer is thinned to at most this many samples
_SNAPSHOT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclasses.dataclass(frozen=True, slots=True)
class Lifecycle:
    """What happens at the timeout and on traffic while paused."""

    auto_pause: bool = False  # at the timeout: pause (True) or kill (False)
    auto_pause_memory: bool = True  # that pause keeps memory (freeze) or only files (stop)
    auto_resume: bool = False  # traffic to a frozen sandbox resumes it


def lifecycle_of(req: Any) -> Lifecycle:
    """The lifecycle a create request asks for: E2B's `autoPause`/`autoPauseMemory`/`autoResume`
    fields, or a `lifecycle` object `{"onTimeout": "pause"|"kill", "autoResume": bool, "keepMemory": bool}`."""
    auto_pause = bool(req.auto_pause)
    keep_memory = bool(req.auto_pause_memory)
    resume = req.auto_resume
    auto_resume = bool(resume.get("enabled")) if isinstance(resume, Mapping) else bool(resume)
    raw = req.lifecycle if isinstance(req.lifecycle, Mapping) else {}
    on_timeout = raw.get("onTimeout", raw.get("on_timeout"))
    if isinstance(on_timeout, Mapping):
        if "keep_memory" in on_timeout or "keepMemory" in on_timeout:
            keep_memory = bool(on_timeout.get("keep_memory", on_timeout.get("keepMemory")))
        on_timeout = on_timeout.get("action")
    if on_timeout in ("pause", "kill"):
        auto_pause = on_timeout == "pause"
    if "autoResume" in raw or "auto_resume" in raw:
        value = raw.get("autoResume", raw.get("auto_resume"))
        auto_resume = bool(value.get("enabled")) if isinstance(value, Mapping) else bool(value)
    if auto_resume and not auto_pause:
        raise InvalidArgument("autoResume needs autoPause: only a sandbox that pauses at its timeout can resume on traffic")
    return Lifecycle(auto_pause=auto_pause, auto_pause_memory=keep_memory, auto_resume=auto_resume)


def validate_snapshot_name(name: str | None) -> str | None:
    if name is None or name == "":
        return None
    if not _SNAPSHOT_NAME_RE.match(name):
        raise InvalidArgument(
            f"invalid snapshot name {name!r}: use up to 128 letters, digits, '.', '_', '-' or '/' (no ':tag')"
        )
    return name


def downsample(items: list[Any], limit: int) -> list[Any]:
    """At most `limit` items, evenly spread, the last one always kept."""
    if len(items) <= limit:
        return items
    step = len(items) / limit
    picked = [items[int(i * step)] for i in range(limit - 1)]
    return picked + [items[-1]]


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
    def __init__(
        self, settings: Settings, store: Any, node: Any, templates: Any, row_type: type, pool: Any = None
    ) -> None:
        self.settings = settings
        self.store = store
        self.node = node
        self.templates = templates
        self.pool = pool  # corral.node.pool.WarmPool: creates claim pre-booted sandboxes from it
        self._row_type = row_type
        self._followups: set[asyncio.Task[None]] = set()  # work left after a kill returned (see _kill)
        self._locks: dict[str, asyncio.Lock] = {}
        self._layers_lock = asyncio.Lock()
        # Committed, not yet referenced: never collected. Counted: equal commits share a digest.
        self._pinned_layers: collections.Counter[str] = collections.Counter()
        # Others that keep layers: each gets the referenced set and returns more layers to keep.
        self.layer_holders: list[Callable[[set[str]], set[str]]] = []
        self.sampler = MetricsSampler(node, store)
        self.scheduler = Scheduler(self.expire_due, self.sampler)
        node.waker = self.wake  # the proxy's traffic to a frozen sandbox comes back here (auto-resume)
        self.network_policies = NetworkPolicies(store, getattr(node, "network", None))  # `network`, PUT /network

    def _lock(self, sandbox_id: str) -> asyncio.Lock:
        return self._locks.setdefault(sandbox_id, asyncio.Lock())

    def _event(self, sandbox_id: str, message: str, level: str = "info") -> None:
        try:
            self.store.add_log(sandbox_id, level, message)
        except Exception:  # a log line must never fail an operation
            log.exception("cannot record log line for sandbox %s", sandbox_id)

    # -- create ----------------------------------------------------------------------------------

    async def create(self, team_id: str, req: Any) -> Any:
        self._check_timeout(req.timeout)
        lifecycle = lifecycle_of(req)
        network = self.network_policies.plan(req)  # validated before anything exists
        template = self._visible_template(team_id, req.template_id)
        pooled = self.pool.claim(template) if self.pool is not None else None
        row = self._new_row(
            team_id,
            sandbox_id=pooled,
            template_id=template.template_id,
            alias=template.names[0] if template.names else None,
            layers=template.layers,
            cpu_count=template.cpu_count,
            memory_mb=template.memory_mb,
            disk_size_mb=template.disk_size_mb,
            timeout=req.timeout,
            metadata=dict(req.metadata or {}),
            env_vars=dict(req.env_vars or {}),
            allow_internet_access=req.allow_internet_access,
            secure=req.secure,
            lifecycle=lifecycle,
        )
        how = f"created from template {template.template_id}"
        if pooled is not None:
            return await self._start_pooled(row, network, how)
        self.network_policies.stage(row.sandbox_id, network)  # recorded when the node attaches it
        return await self._start(row, req.timeout, how)

    def _visible_template(self, team_id: str, ref: str) -> Any:
        """The template `ref` names, when the team may start sandboxes of it: a system one (base),
        its own build, or its own snapshot (snapshot manifests name no team: their row does).
        Another team's answers NotFound like an unknown name, so nothing about it leaks."""
        template = self.templates.get(ref)
        owner = self.template_owner(template)
        if owner is not None and owner != team_id:
            raise NotFound(f"template '{ref}' not found")
        return template

    def template_owner(self, template: Any) -> str | None:
        """The team a template belongs to: its build's team, or for a snapshot (whose manifest
        names no team) its row's; None for the server's own templates (base)."""
        owner = getattr(template, "team_id", None)
        if owner is None:
            snapshot = self.store.get_snapshot(template.template_id)
            owner = snapshot.team_id if snapshot is not None else None
        return owner

    @staticmethod
    def _check_timeout(seconds: int) -> None:
        if seconds < 0 or seconds > MAX_TIMEOUT_S:
            raise InvalidArgument(f"timeout must be between 0 and {MAX_TIMEOUT_S} seconds, got {seconds}")

    def _new_row(
        self,
        team_id: str,
        *,
        sandbox_id: str | None = None,
        template_id: str,
        alias: str | None,
        layers: tuple[str, ...],
        cpu_count: int,
        memory_mb: int,
        disk_size_mb: int,
        timeout: int,
        metadata: dict[str, str],
        env_vars: dict[str, str],
        allow_internet_access: bool,
        secure: bool,
        lifecycle: Lifecycle,
    ) -> Any:
        now = _now()
        return self._row_type(
            sandbox_id=sandbox_id or new_sandbox_id(),
            team_id=team_id,
            template_id=template_id,
            alias=alias,
            client_id="corral",
            state=SandboxState.CREATING,
            started_at=now,
            end_at=now + dt.timedelta(seconds=timeout),
            cpu_count=cpu_count,
            memory_mb=memory_mb,
            disk_size_mb=disk_size_mb,
            envd_access_token=new_access_token(),
            envd_version=ENVD_VERSION,
            metadata=metadata,
            env_vars=env_vars,
            allow_internet_access=allow_internet_access,
            secure=secure,
            auto_pause=lifecycle.auto_pause,
            auto_pause_memory=lifecycle.auto_pause_memory,
            auto_resume=lifecycle.auto_resume,
            timeout_s=timeout,
            layers=tuple(layers),
            ip=None,
            node_id="local",
            killed_at=None,
            kill_reason=None,
        )

    async def _start(self, row: Any, timeout: int, how: str) -> Any:
        """Insert a `creating` row, start its sandbox, mark it running; return the row."""
        sandbox_id = row.sandbox_id
        self.store.insert_sandbox(row)
        try:
            handle = await self.node.create(spec_from_row(row, tuple(row.layers or ())))
        except BaseException as exc:
            self.store.mark_killed(sandbox_id, f"create failed: {exc}")
            raise
        try:
            await self._start_template_processes(handle, row)
        except BaseException as exc:
            self.store.mark_killed(sandbox_id, f"create failed: {exc}")
            self.node.retire(sandbox_id)
            raise
        started = _now()
        running = self.store.update_sandbox(  # returns the row as written: no need to read it again
            sandbox_id,
            state=SandboxState.RUNNING,
            ip=handle.ip,
            started_at=started,
            end_at=started + dt.timedelta(seconds=timeout),
        )
        self._ends_at(started + dt.timedelta(seconds=timeout))
        self._event(sandbox_id, f"sandbox {how}")
        try:
            self.sampler.sample([sandbox_id])  # the first sample is taken right at creation
        except Exception:
            log.exception("first metrics sample of sandbox %s failed", sandbox_id)
        return running if running is not None else self._get(sandbox_id, row.team_id)

    async def _start_pooled(self, row: Any, network: Any, how: str) -> Any:
        """Hand out a sandbox the warm pool booted (its id is the row's): the row is written
        `running` at once, then the request's network policy (only when it is not the default
        the sandbox booted with), env vars and access token take effect, and it is served."""
        sandbox_id = row.sandbox_id
        handle = self.node.lookup(sandbox_id)
        row = dataclasses.replace(row, state=SandboxState.RUNNING, ip=handle.ip)
        self.store.insert_sandbox(row)
        self._ends_at(row.end_at)
        try:
            if network is not None:  # not the default the pooled sandbox booted with
                self.network_policies.stage(sandbox_id, network)
                policy = self.network_policies.policy_for(sandbox_id)  # records the plan
                if policy is not None:
                    await self.node.network.set_policy(sandbox_id, policy)
            self.node.serve(spec_from_row(row, tuple(row.layers or ())))
            await self._start_template_processes(self.node.lookup(sandbox_id), row)
        except BaseException as exc:
            self.store.mark_killed(sandbox_id, f"create failed: {exc}")
            self.node.retire(sandbox_id)
            raise
        self._event(sandbox_id, f"sandbox {how}")
        try:
            self.sampler.sample([sandbox_id])  # the first sample is taken right at creation
        except Exception:
            log.exception("first metrics sample of sandbox %s failed", sandbox_id)
        return row  # as written: no need to read it back

    async def _start_template_processes(self, handle: Any, row: Any) -> None:
        """Start the template's start command and wait for its ready command (TemplateNotReady)."""
        try:
            manifest = self.templates.get(row.template_id)
        except NotFound:  # a template deleted since: nothing to start
            return
        await start_template_processes(handle, manifest)

    # -- read ------------------------------------------------------------------------------------

    def _get(self, sandbox_id: str, team_id: str | None) -> Any:
        row = self.store.get_sandbox(sandbox_id, team_id)
        if row is None or row.state in (SandboxState.KILLED, SandboxState.CREATING):
            raise NotFound(f'sandbox "{sandbox_id}" not found')
        return row

    async def get(self, team_id: str, sandbox_id: str) -> Any:
        return self._get(sandbox_id, team_id)

    async def list(self, team_id: str, query: Any) -> tuple[list[Any], str | None]:
        return self.store.list_sandboxes(team_id, query)

    # -- kill and timeouts -----------------------------------------------------------------------

    async def kill(self, team_id: str, sandbox_id: str, reason: str = "killed by request") -> None:
        self._get(sandbox_id, team_id)
        await self._kill(sandbox_id, reason)

    async def _kill(self, sandbox_id: str, reason: str) -> None:
        async with self._lock(sandbox_id):
            torn_down = await self._kill_locked(sandbox_id, reason)
        self._locks.pop(sandbox_id, None)
        if torn_down:
            await self.collect_layers()

    async def _kill_locked(self, sandbox_id: str, reason: str) -> bool:
        """Kill; True when the sandbox's resources are already gone (else a follow-up finishes)."""
        # The record flips first, so the API never shows a sandbox the proxy no longer serves;
        # if we crash before the resources are gone, reconcile removes them as strays.
        # The node stops serving it now and removes its processes and resources in the
        # background (`Node.retire`), so a kill answers in a few ms instead of ~50; its logs
        # and metrics are purged, and layers only it used collected, once its mounts are gone.
        self.store.mark_killed(sandbox_id, reason)
        self.sampler.forget(sandbox_id)
        gone = self.node.retire(sandbox_id)
        if gone.done():
            self.store.purge_sandbox_data(sandbox_id)
            return True
        self._follow_up(self._after_teardown(sandbox_id, gone))
        return False

    async def _after_teardown(self, sandbox_id: str, gone: asyncio.Future[None]) -> None:
        await asyncio.wait([gone])
        self.store.purge_sandbox_data(sandbox_id)
        await self.collect_layers()

    def _follow_up(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._followups.add(task)
        task.add_done_callback(self._followups.discard)

    async def aclose(self) -> None:
        """Server stop: cancel follow-up work (layer collection runs again at the next start)."""
        for task in list(self._followups):
            task.cancel()
        if self._followups:
            await asyncio.wait(list(self._followups))

    async def set_timeout(self, team_id: str, sandbox_id: str, seconds: int) -> None:
        self._check_timeout(seconds)
        self._get(sandbox_id, team_id)
        fields: dict[str, Any] = {"end_at": _now() + dt.timedelta(seconds=seconds)}
        if seconds > 0:
            fields["timeout_s"] = seconds
        self.store.update_sandbox(sandbox_id, **fields)
        self._ends_at(fields["end_at"])
        if seconds == 0:
            await self.expire_due()

    async def expire_due(self, within: dt.timedelta = dt.timedelta(0)) -> dt.datetime | None:
        """Kill (or pause, when asked) every running sandbox whose end time has passed; returns the
        soonest end still to come within `within` (None: none that soon), for the expiry loop."""
        now = _now()
        soonest = None
        for row in self.store.expired(now + within):  # soonest first; one query, before any await
            if row.end_at > now:
                soonest = row.end_at
                break
            try:
                await self._expire(row.sandbox_id)
            except Exception:  # one bad sandbox must not stop the others from expiring
                log.exception("failed to expire sandbox %s", row.sandbox_id)
        return soonest

    async def _expire(self, sandbox_id: str) -> None:
        async with self._lock(sandbox_id):
            row = self.store.get_sandbox(sandbox_id)
            if row is None or row.state is not SandboxState.RUNNING or row.end_at > _now():
                return  # killed, paused or extended meanwhile
            if row.auto_pause:
                await self._pause_locked(row, row.auto_pause_memory, "timeout")
                return
            await self._kill_locked(sandbox_id, "timeout")
        self._locks.pop(sandbox_id, None)
        await self.collect_layers()

    async def run_expiry(self) -> None:
        """The control plane's background loops (timeouts and metrics); runs until cancelled."""
        await self.scheduler.run()

    def _ends_at(self, end_at: dt.datetime) -> None:
        """A running sandbox's end was set: the expiry loop wakes by then (see corral.server.scheduler)."""
        self.scheduler.clock.note(end_at)

    # -- pause and resume ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _locked_row(self, team_id: str | None, sandbox_id: str) -> AsyncIterator[Any]:
        """The sandbox's live row, read under its lock (NotFound otherwise)."""
        if self.node.lookup(sandbox_id) is None:
            self._get(sandbox_id, team_id)  # unknown ids get no lock: NotFound here, without a write
        async with self._lock(sandbox_id):
            yield self._get(sandbox_id, team_id)

    async def pause(self, team_id: str, sandbox_id: str, keep_memory: bool) -> None:
        async with self._locked_row(team_id, sandbox_id) as row:
            if row.state is SandboxState.PAUSED:
                raise Aborted(f'sandbox "{sandbox_id}" is already paused')
            await self._pause_locked(row, keep_memory, "request")

    async def _pause_locked(self, row: Any, keep_memory: bool, why: str) -> None:
        sandbox_id = row.sandbox_id
        if self.store.update_sandbox(
            sandbox_id, expect_state=SandboxState.RUNNING, state=SandboxState.PAUSED, paused_memory=keep_memory
        ) is None:
            raise Aborted(f'sandbox "{sandbox_id}" is not running')
        try:
            if keep_memory:
                await self.node.freeze(sandbox_id)
            else:
                await self.node.stop(sandbox_id)
        except BaseException:
            self.store.update_sandbox(
                sandbox_id, expect_state=SandboxState.PAUSED, state=SandboxState.RUNNING, paused_memory=None
            )
            raise
        self.sampler.forget(sandbox_id)
        kind = "memory kept" if keep_memory else "filesystem only"
        self._event(sandbox_id, f"sandbox paused ({kind}) by {why}")

    async def connect(self, team_id: str, sandbox_id: str, timeout: int) -> tuple[Any, bool]:
        """Extend a running sandbox's end (never shorten it) or resume a paused one; `(row, resumed)`."""
        timeout = max(0, min(timeout, MAX_TIMEOUT_S))
        async with self._locked_row(team_id, sandbox_id) as row:
            if row.state is SandboxState.PAUSED:
                return await self._resume_locked(row, timeout, "connect"), True
            wanted = _now() + dt.timedelta(seconds=timeout)
            if wanted > row.end_at:
                row = self.store.update_sandbox(sandbox_id, end_at=wanted) or self._get(sandbox_id, team_id)
            return row, False

    async def _resume_locked(self, row: Any, timeout: int, why: str) -> Any:
        """Thaw or cold-boot a paused sandbox, then mark it running; returns its row."""
        sandbox_id = row.sandbox_id
        if row.paused_memory is False:
            await self.node.cold_start(sandbox_id)
        else:
            await self.node.thaw(sandbox_id)
        end_at = _now() + dt.timedelta(seconds=timeout)
        resumed = self.store.update_sandbox(
            sandbox_id,
            expect_state=SandboxState.PAUSED,
            state=SandboxState.RUNNING,
            paused_memory=None,
            end_at=end_at,
        )
        self._ends_at(end_at)
        self._event(sandbox_id, "sandbox resumed" + (" (cold boot)" if row.paused_memory is False else "") + f" by {why}")
        return resumed if resumed is not None else self._get(sandbox_id, row.team_id)

    async def wake(self, sandbox_id: str) -> bool:
        """Auto-resume: traffic reached a frozen sandbox. Resume it when it asked for that."""
        row = self.store.get_sandbox(sandbox_id)
        if row is None or row.state is not SandboxState.PAUSED or not row.auto_resume or row.paused_memory is False:
            return False
        async with self._lock(sandbox_id):
            row = self.store.get_sandbox(sandbox_id)
            if row is None or row.state is not SandboxState.PAUSED:
                return row is not None and row.state is SandboxState.RUNNING
            await self._resume_locked(row, max(1, row.timeout_s), "traffic (auto-resume)")
        return True

    # -- snapshots and forks ---------------------------------------------------------------------

    def _row_layers(self, row: Any) -> tuple[str, ...]:
        if row.layers is not None:
            return tuple(row.layers)
        return tuple(self.templates.get(row.template_id).layers)

    def _pin(self, digest: str) -> None:
        self._pinned_layers[digest] += 1

    def _unpin(self, digest: str) -> None:
        self._pinned_layers[digest] -= 1
        if self._pinned_layers[digest] <= 0:
            del self._pinned_layers[digest]

    async def _commit(self, row: Any) -> str:
        """Copy a sandbox's writable layer into a new layer, frozen meanwhile; its digest, pinned
        (the caller unpins it once a snapshot or sandbox refers to the layer).

        The node pins the digest in the same step of the event loop as the layer appears, or an
        equal existing layer is chosen: were it pinned after the commit returned, a collection in
        between (while the sandbox thaws, say) could remove an equal layer that nothing used yet,
        e.g. a just-deleted snapshot's, and the new snapshot would refer to a missing layer."""
        sandbox_id = row.sandbox_id
        pinned: list[str] = []

        def pin(digest: str) -> None:
            self._pin(digest)
            pinned.append(digest)

        try:
            async with self._lock(sandbox_id):
                self._get(sandbox_id, row.team_id)
                handle = self.node.lookup(sandbox_id)
                if handle is None:
                    raise FailedPrecondition(f'sandbox "{sandbox_id}" is not on this node')
                if handle.status is NodeStatus.RUNNING:
                    await self.node.freeze(sandbox_id)
                    try:
                        digest = await self.node.commit_upper(sandbox_id, pin=pin)
                    finally:
                        await self.node.thaw(sandbox_id)
                else:
                    digest = await self.node.commit_upper(sandbox_id, pin=pin)
        except BaseException:
            for done in pinned:
                self._unpin(done)
            raise
        return str(digest)

    async def create_snapshot(self, team_id: str, sandbox_id: str, name: str | None) -> tuple[str, list[str]]:
        """Snapshot a sandbox's files as a template; `(snapshot id, names)`. The sandbox keeps running.

        A name already used by one of the team's snapshots gives that snapshot a new build (same id).
        """
        name = validate_snapshot_name(name)
        row = self._get(sandbox_id, team_id)
        existing = self.store.snapshot_by_name(team_id, name) if name else None
        if name and existing is None:
            self._check_name_free(name)
        parent = self._parent_template(row)
        digest = await self._commit(row)
        try:
            layers = self._row_layers(row) + (digest,)
            async with self._layers_lock:
                self.store.add_owned_layer(digest, "snapshot")
                existing = self.store.snapshot_by_name(team_id, name) if name else None
                snapshot_id = existing.snapshot_id if existing is not None else new_sandbox_id()
                self.templates.save(
                    TemplateManifest(
                        template_id=snapshot_id,
                        names=(name,) if name else (),
                        layers=layers,
                        cpu_count=row.cpu_count,
                        memory_mb=row.memory_mb,
                        disk_size_mb=row.disk_size_mb,
                        default_user=parent.default_user if parent else "user",
                        default_workdir=parent.default_workdir if parent else None,
                        runtime=parent.runtime if parent else None,  # its sandboxes run where it ran
                    )
                )
                now = _now()
                if existing is not None:
                    self.store.update_snapshot(snapshot_id, sandbox_id=sandbox_id, layer=digest, created_at=now)
                else:
                    self.store.insert_snapshot(
                        SnapshotRow(
                            snapshot_id=snapshot_id,
                            team_id=team_id,
                            sandbox_id=sandbox_id,
                            name=name,
                            layer=digest,
                            created_at=now,
                        )
                    )
        finally:
            self._unpin(digest)
        self._event(sandbox_id, f"snapshot {snapshot_id} taken" + (f" as {name!r}" if name else ""))
        await self.collect_layers()
        return snapshot_id, [name] if name else []

    def _check_name_free(self, name: str) -> None:
        try:
            self.templates.get(name)
        except NotFound:
            return
        raise AlreadyExists(f"name '{name}' is already used by a template")  # maybe another team's: no id

    def _parent_template(self, row: Any) -> Any:
        try:
            return self.templates.get(row.template_id)
        except CorralError:
            return None

    async def fork(self, team_id: str, sandbox_id: str, timeout: int, count: int) -> list[Any]:
        """`count` new sandboxes with copies of the sandbox's files (cold-booted: processes are not
        copied). Returns, per fork, its row or the CorralError that stopped it."""
        self._check_timeout(timeout)
        if not 1 <= count <= MAX_FORKS:
            raise InvalidArgument(f"count must be between 1 and {MAX_FORKS}, got {count}")
        row = self._get(sandbox_id, team_id)
        digest = await self._commit(row)
        results: list[Any] = []
        try:
            self.store.add_owned_layer(digest, "fork")
            layers = self._row_layers(row) + (digest,)
            lifecycle = Lifecycle(row.auto_pause, row.auto_pause_memory, row.auto_resume)
            for _ in range(count):
                new = self._new_row(
                    team_id,
                    template_id=row.template_id,
                    alias=row.alias,
                    layers=layers,
                    cpu_count=row.cpu_count,
                    memory_mb=row.memory_mb,
                    disk_size_mb=row.disk_size_mb,
                    timeout=timeout,
                    metadata=dict(row.metadata),
                    env_vars=dict(row.env_vars),
                    allow_internet_access=row.allow_internet_access,
                    secure=row.secure,
                    lifecycle=lifecycle,
                )
                self.network_policies.inherit(sandbox_id, new.sandbox_id)  # the parent's policy
                try:
                    results.append(await self._start(new, timeout, f"forked from {sandbox_id}"))
                except CorralError as exc:
                    results.append(exc)
                except Exception as exc:
                    log.exception("fork of sandbox %s failed", sandbox_id)
                    results.append(Internal(f"fork failed: {exc}"))
        finally:
            self._unpin(digest)
        self._event(sandbox_id, f"forked {sum(1 for r in results if not isinstance(r, Exception))} time(s)")
        await self.collect_layers()
        return results

    async def list_snapshots(
        self, team_id: str, *, sandbox_id: str | None, name: str | None, limit: int, next_token: str | None
    ) -> tuple[list[Any], str | None]:
        names: set[str] = set()
        if name:
            base, _, tag = name.partition(":")
            if tag and tag != "default":
                return [], None  # snapshots have no tags but `default`
            names = {base}
        return self.store.list_snapshots(
            team_id, sandbox_id=sandbox_id, names=names, limit=limit, next_token=next_token
        )  # type: ignore[no-any-return]

    async def delete_snapshot(self, team_id: str, snapshot_id: str) -> None:
        """`DELETE /templates/{id or name}` for a snapshot. Sandboxes made from it keep working."""
        async with self._layers_lock:
            manifest = self.templates.find(snapshot_id)
            if manifest is not None:
                owner = self.template_owner(manifest)
                if owner is None:
                    raise Unimplemented(f"template '{snapshot_id}' is provided by this server and cannot be deleted")
                if owner == team_id:  # by its name too; another team's name stays unknown
                    snapshot_id = manifest.template_id
            if self.store.delete_snapshot(snapshot_id, team_id) is None:
                raise NotFound(f"template '{snapshot_id}' not found")  # or another team's
            try:
                self.templates.delete(snapshot_id)
            except NotFound:
                pass
        await self.collect_layers()

    async def collect_layers(self) -> list[str]:
        """Delete owned layers nothing refers to (see the module docstring); their digests."""
        async with self._layers_lock:
            owned = self.store.owned_layers()
            if not owned:
                return []
            # From here to the last rename nothing awaits: no create, build or commit can start
            # using a layer between the decision and its retirement.
            in_use = self._referenced_layers()
            removed, retired = [], []
            for digest in owned:
                if digest in in_use:
                    continue
                doomed = retire_layer(self.settings.layers_dir, digest)
                if doomed is not None:
                    retired.append(doomed)
                self.store.remove_owned_layer(digest)
                removed.append(digest)
        for path in retired:
            await asyncio.to_thread(shutil.rmtree, path, True)
        return removed

    def _referenced_layers(self, also: set[str] | None = None) -> set[str]:
        """Every layer something refers to (the collector's references; `also` before the holders)."""
        in_use = set(self.store.layers_in_use()) | set(self._pinned_layers) | self.node.layers_in_use()
        in_use |= also or set()
        for manifest in self.templates.list():
            in_use.update(manifest.all_layers())
        for holder in self.layer_holders:
            in_use |= holder(set(in_use))
        return in_use

    async def adopt_unowned_layers(self, min_age_s: float = ADOPTION_MIN_AGE_S) -> list[str]:
        """At start: record as owned the layers older versions left unowned that nothing refers to
        (`corral.server.layer_adoption`) and collect them; their digests."""
        dirs = await asyncio.to_thread(scan_layer_dirs, self.settings.layers_dir)
        async with self._layers_lock:
            try:  # one decision: no await until the records are written
                rows_without_layers: set[str] = set()  # sandboxes from before rows listed their layers
                for row in self.store.live_sandboxes():
                    if row.layers is None:
                        rows_without_layers.update(self._row_layers(row))
                in_use = self._referenced_layers(rows_without_layers)
            except Exception:  # a reference that cannot be read: adopt nothing
                log.exception("not adopting unowned layers: what refers to layers cannot be read")
                return []
            owned = set(self.store.owned_layers())
            adopted = plan_adoption(dirs, owned, in_use, time.time(), min_age_s)
            for digest in adopted:
                self.store.add_owned_layer(digest, ADOPTED_KIND)
        if adopted:
            log.info("adopted %d unowned layer(s) nothing refers to; collecting them", len(adopted))
            await self.collect_layers()
        return adopted

    # -- metrics and logs ------------------------------------------------------------------------

    async def metrics(self, team_id: str, sandbox_id: str, start: int | None, end: int | None) -> list[Any]:
        self._get(sandbox_id, team_id)
        start_at = dt.datetime.fromtimestamp(start, dt.UTC) if start is not None else None
        end_at = dt.datetime.fromtimestamp(end, dt.UTC) if end is not None else None
        if start_at is not None and end_at is not None and end_at < start_at:
            raise InvalidArgument("end must not be before start")
        return downsample(self.store.metrics(sandbox_id, start_at, end_at), MAX_METRIC_POINTS)

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
    ) -> list[Any]:
        self._get(sandbox_id, team_id)
        start = dt.datetime.fromtimestamp(cursor_ms / 1000, dt.UTC) if cursor_ms is not None else None
        return self.store.logs(  # type: ignore[no-any-return]
            sandbox_id, start=start, limit=limit, forward=forward, min_level=level, search=search
        )

    # -- restart ---------------------------------------------------------------------------------

    async def reconcile(self) -> tuple[list[str], list[str]]:
        """On start: re-adopt running, frozen and stopped sandboxes; mark the lost ones killed."""
        rows = self.store.live_sandboxes()
        specs = []
        paused: dict[str, bool] = {}
        creating = []
        for row in rows:
            if row.state == SandboxState.CREATING:
                creating.append(row.sandbox_id)  # the server died mid-create: never reported as created
                continue
            try:
                layers = self._row_layers(row)
            except CorralError:
                layers = ()
            specs.append(spec_from_row(row, layers))
            if row.state == SandboxState.PAUSED:
                paused[row.sandbox_id] = row.paused_memory is not False
        adopted, lost = await self.node.reconcile(specs, paused)
        for sandbox_id in lost + creating:
            self.store.mark_killed(sandbox_id, "gone after server restart")
            self.store.purge_sandbox_data(sandbox_id)
        self._remove_partial_layers()
        await self.collect_layers()
        return adopted, lost + creating

    def _remove_partial_layers(self) -> None:
        """Copies a crash interrupted (`.tmp-commit-*`, `.tmp-remove-*` in the layers dir)."""
        layers_dir = self.settings.layers_dir
        if not layers_dir.is_dir():
            return
        for pattern in (".tmp-commit-*", ".tmp-remove-*"):
            for leftover in layers_dir.glob(pattern):
                shutil.rmtree(leftover, ignore_errors=True)

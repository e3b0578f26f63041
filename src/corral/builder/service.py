"""The template service: what the template routes call (e2b-protocol.md §2.3, §2.4).

    service = TemplateBuildService(settings, node, templates)   # composition root
    await service.start() ... await service.aclose()

Flow of one build (the official SDK's `Template.build`):

    request_build   POST /v3/templates           → a build record (waiting) and a template id
    upload_link     GET  /templates/{id}/files/{hash} → {present, url}; the client PUTs to `url`
    start_build     POST /v2/templates/{id}/builds/{buildID} → the plan is queued (building)
    build_status    GET  /templates/{id}/builds/{buildID}/status?logsOffset=N → logs and status

Lifecycle of a build (`BuildStatus`): waiting → building → ready | error. At most
`max_concurrent_builds` run at once; the others wait for a slot (still "building" to the client,
with a log line saying so). A build publishes its template only when it succeeded: a failing first
build leaves no template, a failing rebuild leaves the previous build and its tags in place.

Build records (status, reason, log) are kept on disk (`corral.builder.records`, `<home>/builds`),
the latest `MAX_RETAINED_BUILDS` finished ones: after a restart they are still queryable, and a
build the server stopped in the middle of is reported `error` ("the server stopped while the build
was running"). Templates, their builds' fields and their tags live in the manifests
(`TemplateStore`).

Disk: layers a build makes are owned (`own_layer`) and collected by the server's one layer
collector (`collect_layers`, run after a build ends and after a template is deleted) once nothing
refers to them; `layers_to_keep` is what the builder adds to the collector's references — layers
in-flight builds hold and the layers of kept cache entries (`corral.builder.retention`). Before a
collection the builder measures the owned layers cache entries name whose size is not known yet
(`layer_sizes`, once per layer, in a thread), for the cache's byte budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import enum
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

from corral.builder.cache import BuildCache, FileBuildCache
from corral.builder.executor import BuildExecutor, BuildJob, BuildOutcome, StepFailed
from corral.builder.layer_sizes import LayerSizeBook, layer_disk_bytes, unmeasured
from corral.builder.logs import BuildLog, LogEntry
from corral.builder.records import BuildLogFile, BuildRecordStore
from corral.builder.registry import RegistryConfig, RegistryPuller
from corral.builder.retention import CacheBudget, LayerHolds, plan_cache_retention
from corral.builder.steps import BuildPlan, FromTemplate, plan_from_e2b
from corral.builder.uploads import UploadStore
from corral.core.errors import (
    Aborted,
    AlreadyExists,
    CorralError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from corral.core.ids import new_sandbox_id
from corral.core.sandbox import ENVD_VERSION
from corral.core.settings import Settings
from corral.node.runtime.runtimes import runtime_name
from corral.node.storage.templates import DEFAULT_TAG, TemplateManifest, TemplateStore, now_rfc3339

__all__ = [
    "INTERNAL_ERROR_MESSAGE",
    "INTERRUPTED_MESSAGE",
    "BuildRecord",
    "BuildStatus",
    "TemplateBuildService",
    "parse_name",
    "template_json",
    "validate_tags",
]

log = logging.getLogger(__name__)

INTERNAL_ERROR_MESSAGE = "An internal error occurred. Please try again or contact support with the build ID."
INTERRUPTED_MESSAGE = "the server stopped while the build was running; start the build again"
MAX_CONCURRENT_BUILDS = 2
MAX_RETAINED_BUILDS = 200  # finished builds whose status stays queryable
UPLOAD_RETENTION_S = 7 * 24 * 3600.0
_IDENTIFIER_RE = re.compile(r"^[a-z0-9-_]+$")
_TAG_RE = re.compile(r"^[a-z0-9-_.]+$")


class BuildStatus(enum.StrEnum):
    """Lifecycle of a build. Legal transitions: waiting→building→(ready|error); waiting→error."""

    WAITING = "waiting"  # requested (POST /v3/templates), steps not yet posted
    BUILDING = "building"  # steps posted: queued for a slot or running
    READY = "ready"  # published: the template (and its tags) point at this build
    ERROR = "error"  # failed; nothing published


_TRANSITIONS = {
    BuildStatus.WAITING: {BuildStatus.BUILDING, BuildStatus.ERROR},
    BuildStatus.BUILDING: {BuildStatus.READY, BuildStatus.ERROR},
    BuildStatus.READY: set(),
    BuildStatus.ERROR: set(),
}


def parse_name(value: str) -> tuple[str, str | None]:
    """E2B's `[namespace/]alias[:tag]` → (identifier, tag or None for default), lower-cased."""
    value = value.strip()
    identifier, sep, tag_part = value.partition(":")
    tag: str | None = None
    if sep:
        cleaned = tag_part.strip().lower()
        if not _TAG_RE.match(cleaned):
            raise InvalidArgument(f"Invalid name: invalid tag: {tag_part}")
        tag = None if cleaned == DEFAULT_TAG else cleaned
    parts = identifier.split("/")
    if len(parts) > 2:
        raise InvalidArgument(f"Invalid name: {value}")
    cleaned_parts = []
    for part in parts:
        cleaned = part.strip().lower()
        if not _IDENTIFIER_RE.match(cleaned):
            raise InvalidArgument(f"Invalid name: invalid template ID: {part}")
        cleaned_parts.append(cleaned)
    return "/".join(cleaned_parts), tag


def validate_tags(tags: Sequence[str]) -> list[str]:
    """Lower-cased, de-duplicated tags; E2B's rules (no `:`, not a UUID)."""
    out: list[str] = []
    for tag in tags:
        cleaned = str(tag).strip().lower()
        if not _TAG_RE.match(cleaned):
            raise InvalidArgument(f"Invalid tag: invalid tag '{tag}'")
        with contextlib.suppress(ValueError):
            uuid.UUID(cleaned)
            raise InvalidArgument(f"Invalid tag: tag '{tag}' cannot be a UUID")
        if cleaned not in out:
            out.append(cleaned)
    return out


@dataclasses.dataclass(eq=False)
class BuildRecord:
    build_id: str
    template_id: str
    team_id: str
    name: str
    tags: tuple[str, ...]
    cpu_count: int
    memory_mb: int
    status: BuildStatus = BuildStatus.WAITING
    log: BuildLog = dataclasses.field(default_factory=BuildLog)
    reason: dict[str, Any] | None = None
    plan: BuildPlan | None = None
    created_at: str = dataclasses.field(default_factory=now_rfc3339)
    finished_at: str | None = None
    runtime: str | None = None  # the OCI runtime the template's sandboxes run on (None: the server's)

    def move_to(self, status: BuildStatus) -> None:
        if status not in _TRANSITIONS[self.status]:
            raise Aborted(f"build {self.build_id} is {self.status.value}, it cannot become {status.value}")
        self.status = status
        if status in (BuildStatus.READY, BuildStatus.ERROR):
            self.finished_at = now_rfc3339()

    def to_json(self) -> dict[str, Any]:
        """What `BuildRecordStore` keeps (the plan is not kept: a stored build never runs again)."""
        return {
            "buildID": self.build_id,
            "templateID": self.template_id,
            "teamID": self.team_id,
            "name": self.name,
            "tags": list(self.tags),
            "cpuCount": self.cpu_count,
            "memoryMB": self.memory_mb,
            "status": self.status.value,
            "reason": self.reason,
            "createdAt": self.created_at,
            "finishedAt": self.finished_at,
            "runtime": self.runtime,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], entries: Sequence[LogEntry]) -> BuildRecord:
        return cls(
            build_id=str(data["buildID"]),
            template_id=str(data["templateID"]),
            team_id=str(data["teamID"]),
            name=str(data["name"]),
            tags=tuple(str(t) for t in data.get("tags") or ()),
            cpu_count=int(data["cpuCount"]),
            memory_mb=int(data["memoryMB"]),
            status=BuildStatus(data["status"]),
            log=BuildLog(entries),
            reason=data.get("reason"),
            created_at=str(data["createdAt"]),
            finished_at=data.get("finishedAt"),
            runtime=data.get("runtime"),
        )


class TemplateBuildService:
    def __init__(
        self,
        settings: Settings,
        node: Any,
        templates: TemplateStore,
        *,
        cache: BuildCache | None = None,
        uploads: UploadStore | None = None,
        executor: Any = None,
        max_concurrent_builds: int = MAX_CONCURRENT_BUILDS,
        records: BuildRecordStore | None = None,
        cache_budget: CacheBudget | None = None,
        own_layer: Callable[[str, str], None] | None = None,
        collect_layers: Callable[[], Awaitable[Any]] | None = None,
        template_owner: Callable[[TemplateManifest], str | None] | None = None,
        layer_sizes: LayerSizeBook | None = None,
    ) -> None:
        """`own_layer(digest, kind)` records a layer a build made as collectable,
        `collect_layers()` runs the server's layer collector (both given by the composition root;
        without them nothing the builder makes is ever collected) and `layer_sizes` keeps owned
        layers' sizes (without it the cache's byte budget counts every layer as 0 bytes)."""
        self.settings = settings
        self.node = node  # checks the runtime a build asks for (None in tests without sandboxes)
        # The team a template belongs to, snapshots included (their manifests name no team: the
        # composition root asks the store); without it, a manifest's own `team_id`.
        self._template_owner = template_owner or (lambda manifest: manifest.team_id)
        self.templates = templates
        self.cache = cache if cache is not None else FileBuildCache(settings.home / "build-cache")
        self.uploads = uploads if uploads is not None else UploadStore(settings.home / "build-files")
        self.records = records if records is not None else BuildRecordStore(settings.home / "builds")
        self.cache_budget = cache_budget if cache_budget is not None else CacheBudget.from_env()
        self.holds = LayerHolds()
        self._collect_layers = collect_layers
        self._layer_sizes = layer_sizes
        self.executor = executor or BuildExecutor(
            node,
            templates,
            self.cache,
            self.uploads,
            settings,
            pull_image=RegistryPuller(settings.layers_dir, RegistryConfig.from_env()).pull,
            holds=self.holds,
            own_layer=own_layer,
        )
        self._builds: dict[str, BuildRecord] = {}
        self._log_files: dict[str, BuildLogFile] = {}
        self._closing = False
        self._pending: dict[str, tuple[str, str]] = {}  # template id → (team, name) before its first build
        self._slots = asyncio.Semaphore(max_concurrent_builds)
        self._template_locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Read the stored builds back (finishing interrupted ones as errors); drop stale uploads
        and the pieces of pulls a crash interrupted. Runs before any build starts."""
        await asyncio.to_thread(self.uploads.remove_older_than, UPLOAD_RETENTION_S)
        for data, entries in await asyncio.to_thread(self.records.load):
            try:
                record = BuildRecord.from_json(data, entries)
            except (KeyError, ValueError, TypeError) as exc:
                log.warning("ignoring build record %s: %s", data.get("buildID"), exc)
                continue
            self._builds[record.build_id] = record
            if record.finished_at is None:  # waiting or building when the server stopped
                self._attach_log_file(record)
                self._fail(record, INTERRUPTED_MESSAGE, None)
        self._forget_old_builds()
        await asyncio.to_thread(self._remove_partial_pulls)

    def _remove_partial_pulls(self) -> None:
        layers_dir = self.settings.layers_dir
        if layers_dir.is_dir():
            for pattern in (".tmp-oci-*", ".tmp-blob-*"):
                for leftover in layers_dir.glob(pattern):
                    if leftover.is_dir():
                        shutil.rmtree(leftover, ignore_errors=True)
                    else:
                        leftover.unlink(missing_ok=True)

    async def aclose(self) -> None:
        """Cancel running builds (they end as errors) and wait for them to clean up."""
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for log_file in self._log_files.values():
            log_file.close()

    # -- layers ------------------------------------------------------------------------------------

    def layers_to_keep(self, referenced: set[str]) -> set[str]:
        """For the layer collector: given the layers referenced otherwise, the ones the builder
        needs as well (held by in-flight builds, or named by kept cache entries). Drops the cache
        entries retention does not keep. Synchronous: the collector decides in one loop step."""
        if self.holds.committing:  # a commit's digest is not known yet: keep everything
            layers_dir = self.settings.layers_dir
            return set(os.listdir(layers_dir)) if layers_dir.is_dir() else set()
        held = self.holds.held()
        sizes: dict[str, int] = {}
        if self._layer_sizes is not None:
            sizes = {d: size for d, size in self._layer_sizes.owned_layer_sizes().items() if size is not None}
        plan = plan_cache_retention(
            self.cache.usage(), referenced | held, self.cache_budget, time.time(), sizes
        )
        for key in plan.drop_keys:
            self.cache.delete(key)
        return held | plan.keep_layers

    async def measure_layers(self) -> int:
        """Measure the owned layers cache entries name whose size is not known yet (each once, in a
        thread) and remember their sizes; how many were measured."""
        if self._layer_sizes is None:
            return 0
        uses = await asyncio.to_thread(self.cache.usage)
        todo = unmeasured(self._layer_sizes.owned_layer_sizes(), (d for use in uses for d in use.layers))
        measured = 0
        for digest in todo:
            size = await asyncio.to_thread(layer_disk_bytes, self.templates.layer_path(digest))
            if size is not None:  # None: gone (collected meanwhile)
                self._layer_sizes.set_owned_layer_size(digest, size)
                measured += 1
        return measured

    async def measure_and_collect(self) -> None:
        """At start, in the background: sizes of layers owned before sizes were kept, then a
        collection that applies the byte budget to them."""
        try:
            if await self.measure_layers():
                await self._collect()
        except Exception:
            log.exception("measuring layer sizes failed")

    async def _collect(self) -> None:
        if self._collect_layers is None:
            return
        try:
            await self.measure_layers()
            await self._collect_layers()
        except Exception:  # collection is retried after the next build, delete or restart
            log.exception("layer collection failed")

    # -- records -----------------------------------------------------------------------------------

    def _attach_log_file(self, record: BuildRecord) -> None:
        log_file = self.records.log_file(record.build_id)
        self._log_files[record.build_id] = log_file
        record.log.sink = log_file

    def _move(self, record: BuildRecord, status: BuildStatus) -> None:
        """Change a build's status and store the record; a finished build's log file is closed."""
        record.move_to(status)
        self._save(record)
        if record.finished_at is not None:
            record.log.sink = None
            log_file = self._log_files.pop(record.build_id, None)
            if log_file is not None:
                log_file.close()

    def _save(self, record: BuildRecord) -> None:
        try:
            self.records.save(record.to_json())
        except OSError:  # the build goes on; only its record after a restart is lost
            log.exception("cannot store build record %s", record.build_id)

    # -- helpers -----------------------------------------------------------------------------------

    def _lock(self, template_id: str) -> asyncio.Lock:
        return self._template_locks.setdefault(template_id, asyncio.Lock())

    @contextlib.asynccontextmanager
    async def _owned_locked(self, team_id: str, id_or_name: str) -> AsyncIterator[TemplateManifest]:
        """The team's template, read again under its lock (for read-modify-write of its manifest)."""
        template_id = self._owned(team_id, id_or_name).template_id
        async with self._lock(template_id):
            yield self._owned(team_id, template_id)

    def _seen(self, team_id: str, id_or_name: str) -> tuple[TemplateManifest, str | None]:
        """The template (by id or name) and its owner, when the team may know of it: a public one
        (owner None: the server's, like base), its own build or its own snapshot. Another team's
        (snapshots too) raises exactly the NotFound an unknown name raises, so nothing leaks."""
        manifest = self.templates.find(id_or_name)
        owner = self._template_owner(manifest) if manifest is not None else None
        if manifest is None or owner not in (None, team_id):
            raise NotFound(f"template '{id_or_name}' not found")
        return manifest, owner

    def _owned(self, team_id: str, id_or_name: str) -> TemplateManifest:
        """The team's own built template (by id or name): 404 for an unknown or another team's one,
        403 for a public one (the server's) or a snapshot (neither is the builder's to change)."""
        manifest, owner = self._seen(team_id, id_or_name)
        if owner is None:
            raise PermissionDenied(f"template '{id_or_name}' belongs to this server, not to your team")
        if manifest.team_id != team_id:  # the team's snapshot: its manifest names no team
            raise PermissionDenied(f"template '{id_or_name}' is a snapshot, not a built template")
        return manifest

    def _visible(self, team_id: str, ref: str) -> TemplateManifest:
        manifest = self.templates.get(ref)
        if self._template_owner(manifest) not in (None, team_id):  # another team's, snapshots too
            raise NotFound(f"template '{ref}' not found")
        return manifest

    def _build(self, team_id: str, template_id: str, build_id: str) -> BuildRecord:
        record = self._builds.get(build_id)
        if (
            record is None
            or record.team_id != team_id
            or template_id not in (record.template_id, record.name)
        ):
            raise NotFound(f"build '{build_id}' of template '{template_id}' not found")
        return record

    def _forget_old_builds(self) -> None:
        finished = [r for r in self._builds.values() if r.finished_at is not None]
        for record in sorted(finished, key=lambda r: r.finished_at or "")[
            : max(0, len(finished) - MAX_RETAINED_BUILDS)
        ]:
            del self._builds[record.build_id]
            try:
                self.records.delete(record.build_id)
            except (OSError, ValueError):
                log.exception("cannot delete build record %s", record.build_id)

    # -- POST /v3/templates ------------------------------------------------------------------------

    async def request_build(
        self,
        team_id: str,
        name: str,
        tags: Sequence[str],
        cpu_count: int,
        memory_mb: int,
        runtime: str | None = None,
    ) -> dict[str, Any]:
        identifier, tag = parse_name(name)
        all_tags = validate_tags(([tag] if tag else []) + list(tags)) or [DEFAULT_TAG]
        if runtime:  # Corral's own field: sandboxes of the template run on this runtime
            runtime = runtime_name(runtime)  # InvalidArgument for a name that is no runtime
            if self.node is not None:
                await self.node.runtime_named(runtime)  # installed, and not refused (FailedPrecondition)
        existing = self.templates.find(identifier)
        if existing is not None:
            # Names are one namespace, so a taken name is refused; another team's template answers
            # the same whether it is a build or a snapshot, and names neither its id nor its kind.
            owner = self._template_owner(existing)
            if owner is None:
                raise PermissionDenied(f"the name '{identifier}' is taken by a template this server provides")
            if owner != team_id:
                raise AlreadyExists(f"template name '{identifier}' is taken by another team")
            if existing.team_id != team_id:
                raise PermissionDenied(f"the name '{identifier}' is taken by one of your snapshots")
            template_id = existing.template_id
        else:
            template_id = (
                next(
                    (
                        tid
                        for tid, (team, pending) in self._pending.items()
                        if team == team_id and pending == identifier
                    ),
                    None,
                )
                or new_sandbox_id()
            )
            self._pending[template_id] = (team_id, identifier)
        record = BuildRecord(
            build_id=str(uuid.uuid4()),
            template_id=template_id,
            team_id=team_id,
            name=identifier,
            tags=tuple(all_tags),
            cpu_count=cpu_count,
            memory_mb=memory_mb,
            runtime=runtime or None,
        )
        self._forget_old_builds()
        self._builds[record.build_id] = record
        self._attach_log_file(record)
        self._save(record)
        return {
            "templateID": template_id,
            "buildID": record.build_id,
            "public": False,
            "names": [identifier],
            "aliases": [identifier],
            "tags": all_tags,
        }

    # -- GET /templates/{id}/files/{hash} + PUT /upload/<token> ------------------------------------

    def _check_template_of_team(self, team_id: str, template_id: str) -> None:
        pending = self._pending.get(template_id)
        if pending is not None and pending[0] == team_id:
            return
        manifest = self.templates.find(template_id)
        if manifest is None or manifest.team_id != team_id:
            raise NotFound(f"template '{template_id}' not found")

    async def upload_link(
        self, team_id: str, template_id: str, files_hash: str, base_url: str
    ) -> dict[str, Any]:
        self._check_template_of_team(team_id, template_id)
        present = self.uploads.present(team_id, files_hash)
        token = self.uploads.issue(team_id, files_hash)
        return {"present": present, "url": f"{base_url.rstrip('/')}/upload/{token}"}

    async def receive_upload(self, token: str, chunks: Any, declared_size: int | None) -> int:
        return await self.uploads.receive(token, chunks, declared_size)

    # -- POST /v2/templates/{id}/builds/{buildID} ----------------------------------------------------

    async def start_build(
        self, team_id: str, template_id: str, build_id: str, body: Mapping[str, Any]
    ) -> None:
        record = self._build(team_id, template_id, build_id)
        plan = plan_from_e2b(body)
        if isinstance(plan.base, FromTemplate):
            self._visible(team_id, plan.base.template)  # 404 now rather than a failed build later
        if record.status is not BuildStatus.WAITING:
            raise AlreadyExists(f"build '{build_id}' was already started")
        record.plan = plan
        self._move(record, BuildStatus.BUILDING)
        record.log.add(f"Building template {record.template_id}/{record.build_id}")
        task = asyncio.get_running_loop().create_task(self._run(record), name=f"build-{build_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, record: BuildRecord) -> None:
        assert record.plan is not None
        started = time.monotonic()
        try:
            if self._slots.locked():
                record.log.add("Waiting for a free build slot (other builds are running)")
            async with self._slots:
                job = BuildJob(
                    build_id=record.build_id,
                    template_id=record.template_id,
                    scope=record.team_id,
                    plan=record.plan,
                    cpu_count=record.cpu_count,
                    memory_mb=record.memory_mb,
                    log=record.log,
                )
                outcome = await self.executor.run(job)
                await self._publish(record, outcome)
        except StepFailed as exc:
            self._fail(record, exc.message, exc.step)
        except asyncio.CancelledError:
            self._fail(record, INTERRUPTED_MESSAGE if self._closing else "build was cancelled", None)
            raise
        except CorralError as exc:
            self._fail(record, exc.message, None)
        except Exception:
            log.exception("build %s of template %s failed", record.build_id, record.template_id)
            self._fail(record, INTERNAL_ERROR_MESSAGE, None)
        else:
            took = datetime.timedelta(seconds=int(time.monotonic() - started))
            record.log.add(f"Build finished, took {took}")
            self._move(record, BuildStatus.READY)
        finally:
            self.holds.release(record.build_id)  # published or failed: the manifest (or nothing) refers
        if not self._closing:
            await self._collect()

    def _fail(self, record: BuildRecord, message: str, step: str | None) -> None:
        record.log.add(f"Build failed: {message}", "error", step)
        record.reason = {"message": message}
        if step is not None:
            record.reason["step"] = step
        self._move(record, BuildStatus.ERROR)
        others = any(
            r.template_id == record.template_id and r.finished_at is None for r in self._builds.values()
        )
        if not others:  # a template that never built stays unknown
            self._pending.pop(record.template_id, None)

    async def _publish(self, record: BuildRecord, outcome: BuildOutcome) -> None:
        async with self._lock(record.template_id):
            existing = self.templates.find(record.template_id)
            now = now_rfc3339()
            old_tags: dict[str, str] = {}
            older: dict[str, dict[str, Any]] = {}
            if existing is not None:
                old_tags = dict(existing.tags) or {DEFAULT_TAG: existing.build_id}
                older = dict(existing.tagged_builds)
                older[existing.build_id] = existing.build_fields()
            tags = {**old_tags, **{tag: record.build_id for tag in record.tags}}
            tagged = {
                bid: fields
                for bid, fields in older.items()
                if bid in tags.values() and bid != record.build_id
            }
            manifest = TemplateManifest(
                template_id=record.template_id,
                names=existing.names if existing is not None else (record.name,),
                layers=outcome.layers,
                cpu_count=record.cpu_count,
                memory_mb=record.memory_mb,
                default_user=outcome.context.user,
                default_workdir=outcome.context.workdir,
                created_at=existing.created_at if existing is not None else now,
                build_id=record.build_id,
                env_vars=outcome.context.env_dict(),
                start_cmd=outcome.start_cmd,
                ready_cmd=outcome.ready_cmd,
                team_id=record.team_id,
                updated_at=now,
                tags=tags,
                tagged_builds=tagged,
                runtime=record.runtime,
            )
            await asyncio.to_thread(self.templates.save, manifest)
            self._pending.pop(record.template_id, None)

    # -- GET /templates/{id}/builds/{buildID}/status -------------------------------------------------

    async def build_status(
        self, team_id: str, template_id: str, build_id: str, logs_offset: int
    ) -> dict[str, Any]:
        record = self._build(team_id, template_id, build_id)
        entries = record.log.page(logs_offset)
        body: dict[str, Any] = {
            "templateID": record.template_id,
            "buildID": record.build_id,
            "status": record.status.value,
            "logEntries": [entry.to_json() for entry in entries],
            "logs": [f"{entry.to_json()['timestamp']} {entry.message}" for entry in entries],
        }
        if record.reason is not None:
            reason = dict(record.reason)
            reason["logEntries"] = [e.to_json() for e in record.log.tail(20) if e.level in ("warn", "error")]
            body["reason"] = reason
        return body

    # -- aliases, tags, list, delete ---------------------------------------------------------------

    async def alias(self, team_id: str, alias: str) -> dict[str, Any]:
        """E2B answers 403 for another team's name (`Template.exists` → True); Corral answers the 404
        of an unknown name, so a key learns nothing about other teams' templates and snapshots."""
        manifest, owner = self._seen(team_id, alias)
        return {"templateID": manifest.template_id, "public": owner is None}

    async def assign_tags(self, team_id: str, target: str, tags: Sequence[str]) -> dict[str, Any]:
        if not tags:
            raise InvalidArgument("At least one tag is required")
        identifier, tag = parse_name(target)
        cleaned = validate_tags(tags)
        async with self._owned_locked(team_id, identifier) as manifest:
            try:
                source = manifest.for_tag(tag or DEFAULT_TAG)
            except NotFound:
                raise NotFound(f"Template '{target}' with tag '{tag or DEFAULT_TAG}' not found") from None
            new_tags = dict(manifest.tags) or {DEFAULT_TAG: manifest.build_id}
            new_tags.update({t: source.build_id for t in cleaned})
            updated = dataclasses.replace(manifest, tags=new_tags, updated_at=now_rfc3339())
            await asyncio.to_thread(self.templates.save, updated)
        return {"buildID": source.build_id, "tags": cleaned}

    async def remove_tags(self, team_id: str, name: str, tags: Sequence[str]) -> None:
        if not tags:
            raise InvalidArgument("At least one tag is required")
        identifier, _ = parse_name(name)
        cleaned = validate_tags(tags)
        async with self._owned_locked(team_id, identifier) as manifest:
            current = dict(manifest.tags) or {DEFAULT_TAG: manifest.build_id}
            missing = [t for t in cleaned if t not in current]
            if missing:
                raise NotFound(f"tag '{missing[0]}' of template '{identifier}' not found")
            for tag in cleaned:
                del current[tag]
            kept = {bid: f for bid, f in manifest.tagged_builds.items() if bid in current.values()}
            updated = dataclasses.replace(
                manifest, tags=current, tagged_builds=kept, updated_at=now_rfc3339()
            )
            await asyncio.to_thread(self.templates.save, updated)

    async def list_tags(self, team_id: str, id_or_name: str) -> list[dict[str, Any]]:
        identifier, _ = parse_name(id_or_name) if ":" in id_or_name else (id_or_name, None)
        try:
            manifest, _owner = self._seen(team_id, identifier)
        except NotFound:
            raise NotFound(f"template '{id_or_name}' not found") from None
        tags = dict(manifest.tags) or {DEFAULT_TAG: manifest.build_id}
        out = []
        for tag, build_id in sorted(tags.items()):
            try:
                created = manifest.for_build(build_id).created_at
            except NotFound:
                continue
            out.append({"tag": tag, "buildID": _as_uuid(build_id), "createdAt": created})
        return out

    async def list_templates(self, team_id: str) -> list[dict[str, Any]]:
        return [template_json(m) for m in self.templates.list() if m.team_id == team_id]

    async def delete_template(self, team_id: str, id_or_name: str) -> bool:
        """Delete the team's built template; False when there is none by that id or name (it may be
        a snapshot, which the sandbox service deletes). Its layers stay until collected."""
        manifest = self.templates.find(id_or_name)
        if manifest is None or manifest.team_id != team_id:
            return False
        async with self._owned_locked(team_id, id_or_name) as manifest:
            await asyncio.to_thread(self.templates.delete, manifest.template_id)
        await self._collect()  # its layers go unless a sandbox, another template or the cache keeps them
        return True


def _as_uuid(build_id: str) -> str:
    """Tags answer with UUID build ids (the SDK parses them); older manifests may hold other ids."""
    try:
        return str(uuid.UUID(build_id))
    except ValueError:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"corral-build:{build_id}"))


def template_json(manifest: TemplateManifest) -> dict[str, Any]:
    """E2B `Template` (an item of `GET /templates`)."""
    return {
        "templateID": manifest.template_id,
        "buildID": manifest.build_id,
        "cpuCount": manifest.cpu_count,
        "memoryMB": manifest.memory_mb,
        "diskSizeMB": manifest.disk_size_mb,
        "public": manifest.public,
        "aliases": list(manifest.names),
        "names": list(manifest.names),
        "createdAt": manifest.created_at,
        "updatedAt": manifest.updated_at or manifest.created_at,
        "createdBy": None,
        "lastSpawnedAt": None,
        "spawnCount": 0,
        "buildCount": 1 + len(manifest.tagged_builds),
        "envdVersion": ENVD_VERSION,
        "buildStatus": "ready",
    }

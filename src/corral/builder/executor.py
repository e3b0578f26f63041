"""Executes a `BuildPlan` on the node: base → steps → finishing phase, with the layer cache.

    executor = BuildExecutor(node, templates, cache, uploads, settings)
    outcome = await executor.run(job)        # BuildOutcome(layers, context, start_cmd, ready_cmd)
                                             # or StepFailed(message, step)

For every step the cache key is computed (`corral.builder.cache`); a hit whose layers all still
exist is taken as is (no sandbox, no work). A miss runs the step in a fresh build sandbox on the
current layer stack (`BuildSandbox`): RUN/COPY/WORKDIR/USER commit the sandbox's upper dir as a new
layer (none when nothing changed), ENV only changes the context (a shell evaluates values with `$`).
The result goes into the cache under the key. New layers are content-addressed (`Node.commit_upper`
names them by a digest of the tree) and published with one rename, so a layer exists complete or
not at all; a failed step leaves no layer behind.

Layer collection (`corral.builder.retention`): every layer the build looks at is held for the
build (`LayerHolds`) *before* its existence is checked, and every layer it makes is recorded as
owned (`own_layer(digest, "build" | "pull")`), so it is collected once no template, sandbox or
kept cache entry refers to it.

Step numbers in logs and errors are E2B's: "0" is the base (FROM and the default user), "1".."N"
the steps, "finalize" the finishing phase. Messages match E2B's template-manager:
`failed to run command 'whoami': command failed: unauthenticated: invalid username: 'root123'`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import posixpath
import secrets
import time
from collections.abc import Callable
from typing import Any

from corral.builder import base as base_builder
from corral.builder.cache import BuildCache, CacheEntry, finalize_key, stack_key, step_key
from corral.builder.images import DistroBase, RegistryBase, TemplateBase, resolve_image
from corral.builder.logs import BuildLog
from corral.builder.retention import LayerHolds
from corral.builder.sandbox import BuildSandbox, CommandFailed
from corral.builder.startcmd import READY_TIMEOUT_S, TemplateNotReady, wait_until_ready
from corral.builder.steps import (
    DEFAULT_READY_WAIT_CMD,
    BuildContext,
    BuildPlan,
    Copy,
    Env,
    FromImage,
    FromTemplate,
    Run,
    Step,
    User,
    Workdir,
    split_copy_source,
)
from corral.builder.uploads import UploadStore
from corral.core.errors import CorralError, NotFound, Unimplemented
from corral.core.sandbox import DEFAULT_USER
from corral.core.settings import Settings
from corral.node.runtime.base import ExitStatus, UserIds

__all__ = [
    "STEP_TIMEOUT_S",
    "BuildExecutor",
    "BuildJob",
    "BuildOutcome",
    "StepFailed",
    "max_stack_layers",
]

log = logging.getLogger(__name__)

STEP_TIMEOUT_S = 3600.0  # E2B's hard limit for one command
_MOUNT_DATA_MAX = 4095  # mount(2) options travel in one page


class StepFailed(Exception):
    """A build failed at `step` ("0" base, "1".."N", "finalize"); `message` is for the user."""

    def __init__(self, message: str, step: str) -> None:
        super().__init__(message)
        self.message = message
        self.step = step


@dataclasses.dataclass(frozen=True, slots=True)
class BuildJob:
    build_id: str
    template_id: str
    scope: str  # the team: uploads and COPY cache keys are per team
    plan: BuildPlan
    cpu_count: int
    memory_mb: int
    log: BuildLog


@dataclasses.dataclass(frozen=True, slots=True)
class BuildOutcome:
    layers: tuple[str, ...]
    context: BuildContext  # workdir resolved (never None)
    start_cmd: str | None
    ready_cmd: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class _Base:
    key: str
    layers: tuple[str, ...]
    context: BuildContext
    start_cmd: str | None = None
    ready_cmd: str | None = None
    provision_user: bool = False  # an image: create the default user first, as E2B does


def max_stack_layers(settings: Settings) -> int:
    """How many layers fit into one overlay mount's options (lowerdir paths + upper + work)."""
    per_layer = len(str(settings.layers_dir)) + 1 + 64 + 1
    sandbox_dir = len(str(settings.sandboxes_dir)) + 1 + 20
    fixed = len("lowerdir=,upperdir=,workdir=,xino=off") + 2 * (sandbox_dir + 12) + 64  # + other options
    return max(1, (_MOUNT_DATA_MAX - fixed) // per_layer)


def _env_printf(value: str) -> str:
    """E2B's ENV evaluation: `printf "%s" "<value>"` with only `$VAR` expansion left active."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`").replace("$(", "\\$(")
    return f'printf "%s" "{escaped}"'


# Moves an unpacked COPY source into place (E2B's copy_script.sh, values passed in the environment).
COPY_SCRIPT = r"""
set -o pipefail
cd "$CORRAL_STAGING" || exit 1
mkdir -p unpack
tar --no-same-owner -xf files.tar -C unpack || { echo "Error: cannot unpack the uploaded files"; exit 1; }
rm -f files.tar
workdir="$CORRAL_WORKDIR"
if [ -z "$workdir" ]; then
    workdir=$(getent passwd "$CORRAL_USER" | cut -d: -f6)
fi
cd "$workdir" || exit 1
targetPath="$CORRAL_TARGET"
if [[ "$targetPath" != /* ]]; then
    targetPath="$(pwd)/$targetPath"
fi
sourcePath="$CORRAL_STAGING/unpack/$CORRAL_SOURCE"
cd "$(dirname "$sourcePath")" || exit 1
entry="$(basename "$sourcePath")"
if [ ! -e "$entry" ] && [ ! -L "$entry" ]; then
    echo "Error: source path does not exist: $CORRAL_SOURCE"
    exit 1
fi
if [ -L "$entry" ]; then
    if [[ "$targetPath" == */ ]]; then mkdir -p "$targetPath"; else mkdir -p "$(dirname "$targetPath")"; fi
    chown -h "$CORRAL_OWNER" "$entry"
    mv "$entry" "$targetPath"
elif [ -f "$entry" ]; then
    chown "$CORRAL_OWNER" "$entry"
    if [ -n "$CORRAL_MODE" ]; then chmod "$CORRAL_MODE" "$entry"; fi
    if [[ "$targetPath" == */ ]]; then mkdir -p "$targetPath"; else mkdir -p "$(dirname "$targetPath")"; fi
    mv "$entry" "$targetPath"
elif [ -d "$entry" ]; then
    chown -R "$CORRAL_OWNER" "$entry"
    if [ -n "$CORRAL_MODE" ]; then chmod -R "$CORRAL_MODE" "$entry"; fi
    mkdir -p "$targetPath"
    (cd "$entry" && tar -cf - .) | tar -xf - -C "$targetPath" --keep-directory-symlink --no-overwrite-dir || exit 1
else
    echo "Error: entry is neither file, directory, nor symlink"
    exit 1
fi
cd / && rm -rf "$CORRAL_STAGING"
"""

WORKDIR_SCRIPT = r"""
target="$CORRAL_TARGET"
if [ ! -d "$target" ]; then
    first_new=""
    check="$target"
    while [ ! -d "$check" ]; do
        first_new="$check"
        check=$(dirname "$check")
    done
    if [ -n "$first_new" ]; then
        mkdir -p "$target" && chown -R "$CORRAL_USER:$(id -gn "$CORRAL_USER")" "$first_new" || exit 1
    fi
fi
cd "$target" && pwd
"""

USER_SCRIPT = r"""
name="$CORRAL_NAME"
if ! id -u "$name" >/dev/null 2>&1; then
    useradd --create-home --shell /bin/bash "$name" || exit 1
fi
if [ "$CORRAL_SUDO" = "true" ]; then
    if getent group sudo >/dev/null; then usermod -aG sudo "$name"
    elif getent group wheel >/dev/null; then usermod -aG wheel "$name"
    else echo "neither the sudo nor the wheel group exists on this image" >&2; exit 1
    fi
    passwd -d "$name" >/dev/null
    if [ -d /etc/sudoers.d ]; then
        line="$name ALL=(ALL:ALL) NOPASSWD: ALL"
        grep -qxF "$line" /etc/sudoers.d/"$name" 2>/dev/null || { echo "$line" > /etc/sudoers.d/"$name"; chmod 0440 /etc/sudoers.d/"$name"; }
    fi
fi
"""


class BuildExecutor:
    def __init__(
        self,
        node: Any,
        templates: Any,
        cache: BuildCache,
        uploads: UploadStore,
        settings: Settings,
        *,
        ensure_distro_layer: Callable[..., str] | None = None,
        pull_image: Callable[..., Any] | None = None,
        holds: LayerHolds | None = None,
        own_layer: Callable[[str, str], None] | None = None,
    ) -> None:
        self._node = node
        self._templates = templates
        self._cache = cache
        self._uploads = uploads
        self._settings = settings
        self._layers_dir = settings.layers_dir
        self._max_layers = max_stack_layers(settings)
        self._ensure_distro_layer = ensure_distro_layer or base_builder.ensure_recipe_layer
        self._pull_image = pull_image
        self._key_locks: dict[str, asyncio.Lock] = {}
        self._holds = holds if holds is not None else LayerHolds()
        self._own_layer = own_layer

    def _hold(self, job: BuildJob, digests: tuple[str, ...] | list[str]) -> None:
        self._holds.hold(job.build_id, digests)

    def _claim(self, job: BuildJob, digest: str, kind: str) -> None:
        """A layer this build made (or is about to make): held, and owned so it can be collected."""
        self._hold(job, [digest])
        if self._own_layer is not None:
            self._own_layer(digest, kind)

    # -- the whole build ---------------------------------------------------------------------------

    async def run(self, job: BuildJob) -> BuildOutcome:
        plan = job.plan
        total = len(plan.steps)
        forced_from = plan.forced_from()
        base = await self._resolve_base(job)
        key, layers, context = base.key, base.layers, base.context
        if base.provision_user:
            provision = User(name=DEFAULT_USER, sudo=True)
            key, layers, context = await self._step(job, provision, "0", "base", key, layers, context, plan.force)
        for index, step in enumerate(plan.steps, start=1):
            forced = forced_from is not None and index - 1 >= forced_from
            key, layers, context = await self._step(
                job, step, str(index), f"builder {index}/{total}", key, layers, context, forced
            )
        start_cmd, ready_cmd = base.start_cmd, base.ready_cmd
        if plan.start_cmd or plan.ready_cmd:  # E2B: the template's own pair replaces its parent's
            start_cmd, ready_cmd = plan.start_cmd, plan.ready_cmd
        if start_cmd and not ready_cmd:
            ready_cmd = DEFAULT_READY_WAIT_CMD
        context = await self._finalize(
            job, key, layers, context, start_cmd, ready_cmd, forced_from is not None
        )
        return BuildOutcome(layers=layers, context=context, start_cmd=start_cmd, ready_cmd=ready_cmd)

    # -- base --------------------------------------------------------------------------------------

    async def _resolve_base(self, job: BuildJob) -> _Base:
        base = job.plan.base
        try:
            if isinstance(base, FromTemplate):
                return self._template_base(base.template, job, base.describe())
            assert isinstance(base, FromImage)
            resolved = resolve_image(base.image)
            if isinstance(resolved, TemplateBase):
                return self._template_base(resolved.template, job, f"FROM {base.image}")
            if isinstance(resolved, DistroBase):
                if resolved.note:
                    job.log.add(resolved.note, "warn", "0")
                digest = await asyncio.to_thread(
                    self._ensure_distro_layer,
                    self._settings,
                    resolved.recipe,
                    lambda line: job.log.add(line, "info", "0"),
                )
                self._hold(job, [digest])
                return self._image_base(job, base, (digest,), BuildContext(user="root"))
            assert isinstance(resolved, RegistryBase)
            if self._pull_image is None:
                raise Unimplemented(
                    f"pulling {base.image} from a registry is not supported by this server yet"
                )
            pulled = await self._pull_image(
                resolved.reference, base.registry, job.log, claim=lambda d: self._claim(job, d, "pull")
            )
            return self._image_base(job, base, tuple(pulled.layers), pulled.context)
        except StepFailed:
            raise
        except CorralError as exc:
            raise StepFailed(exc.message, "0") from None

    def _template_base(self, ref: str, job: BuildJob, what: str) -> _Base:
        try:
            manifest = self._templates.get(ref)
        except NotFound:
            raise StepFailed(f"template '{ref}' not found", "0") from None
        context = BuildContext(
            user=manifest.default_user,
            workdir=manifest.default_workdir,
            env=tuple(sorted((manifest.env_vars or {}).items())),
        )
        key = stack_key(manifest.layers, context)
        self._hold(job, manifest.layers)
        self._require_layers(manifest.layers, "0")
        job.log.add(f"[base] {what} [{key[:12]}]", "info", "0")
        return _Base(key, tuple(manifest.layers), context, manifest.start_cmd, manifest.ready_cmd)

    def _image_base(
        self, job: BuildJob, base: FromImage, layers: tuple[str, ...], context: BuildContext
    ) -> _Base:
        key = stack_key(layers, context)
        job.log.add(f"[base] {base.describe()} [{key[:12]}]", "info", "0")
        return _Base(key, layers, context, provision_user=True)

    def _require_layers(self, layers: tuple[str, ...], step: str) -> None:
        missing = [d for d in layers if not self._templates.layer_path(d).is_dir()]
        if missing:
            raise StepFailed(f"layer {missing[0][:12]} of the base is missing on this server", step)

    # -- one step ----------------------------------------------------------------------------------

    def _cached(self, job: BuildJob, key: str) -> CacheEntry | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        self._hold(job, entry.layers)  # before the check: from now on nothing collects them
        if not all(self._templates.layer_path(d).is_dir() for d in entry.layers):
            return None  # a layer was collected: build again
        self._cache.touch(key)
        return entry

    async def _step(
        self,
        job: BuildJob,
        step: Step,
        number: str,
        prefix: str,
        parent_key: str,
        layers: tuple[str, ...],
        context: BuildContext,
        forced: bool,
    ) -> tuple[str, tuple[str, ...], BuildContext]:
        key = step_key(parent_key, step, scope=job.scope)
        entry = None if forced else self._cached(job, key)
        if entry is not None:
            job.log.add(f"CACHED [{prefix}] {step.describe()} [{key[:12]}]", "info", number)
            return key, entry.layers, entry.context
        job.log.add(f"[{prefix}] {step.describe()} [{key[:12]}]", "info", number)
        lock = self._key_locks.setdefault(key, asyncio.Lock())
        async with lock:
            entry = None if forced else self._cached(job, key)  # a concurrent build may have made it
            if entry is None:
                started = time.monotonic()
                layers, context = await self._execute(job, step, number, prefix, key, layers, context)
                entry = CacheEntry(layers=layers, context=context)
                self._cache.put(key, entry)
                log.debug("step %s of build %s took %.2f s", number, job.build_id, time.monotonic() - started)
        if not lock.locked():
            self._key_locks.pop(key, None)
        return key, entry.layers, entry.context

    async def _execute(
        self,
        job: BuildJob,
        step: Step,
        number: str,
        prefix: str,
        key: str,
        layers: tuple[str, ...],
        context: BuildContext,
    ) -> tuple[tuple[str, ...], BuildContext]:
        if isinstance(step, Env) and not step.needs_shell:
            return layers, context.with_env(dict(step.values))
        if len(layers) >= self._max_layers:
            raise StepFailed(
                f"the template would have more than {self._max_layers} layers, the most one sandbox can "
                "stack; combine RUN steps (`&&`) to make fewer layers",
                number,
            )
        sandbox = await self._open(job, layers, number)
        try:
            context = await self._run_step(job, sandbox, step, number, prefix, context)
            if isinstance(step, Env):
                return layers, context
            try:
                with self._holds.commit():  # until the digest is held, no layer is collected
                    digest = await sandbox.commit()
                    if digest:
                        self._claim(job, digest, "build")
            except CorralError as exc:
                raise StepFailed(f"saving the files of the step failed: {exc.message}", number) from None
            return (layers + (digest,) if digest else layers), context
        finally:
            await sandbox.close()

    async def _open(self, job: BuildJob, layers: tuple[str, ...], number: str) -> BuildSandbox:
        try:
            return await BuildSandbox.open(
                self._node,
                layers=layers,
                template_id=job.template_id,
                cpu_count=job.cpu_count,
                memory_mb=job.memory_mb,
            )
        except CorralError as exc:
            raise StepFailed(f"cannot start a build sandbox: {exc.message}", number) from None

    def _sink(self, job: BuildJob, prefix: str, number: str) -> Callable[[str, str], None]:
        def sink(stream: str, line: str) -> None:
            if line.strip():
                job.log.add(f"[{prefix}] [{stream}]: {line.rstrip()}", "info", number)

        return sink

    @staticmethod
    def _user(sandbox: BuildSandbox, name: str, command: str) -> UserIds:
        try:
            return sandbox.user(name)
        except CorralError as exc:
            raise CommandFailed(
                f"failed to run command '{command}': command failed: {exc.code}: {exc.message}"
            ) from None

    async def _as_root(
        self,
        job: BuildJob,
        sandbox: BuildSandbox,
        script: str,
        env: dict[str, str],
        prefix: str,
        number: str,
        what: str,
    ) -> list[str]:
        """Run one of our scripts as root; its output lines. Fails as `<what>: <last line>`."""
        lines: list[str] = []
        sink = self._sink(job, prefix, number)

        def collect(stream: str, line: str) -> None:
            lines.append(line)
            if stream == "stderr" or line.startswith("Error"):
                sink(stream, line)

        try:
            root = sandbox.user("root")
            status = await sandbox.run(
                script, user=root, cwd="/", env=env, on_output=collect, timeout_s=STEP_TIMEOUT_S
            )
        except (CommandFailed, CorralError) as exc:
            raise CommandFailed(f"{what}: {exc.message}") from None
        if status.exit_code != 0 or status.signal is not None:
            detail = next((line for line in reversed(lines) if line.strip()), status.status)
            raise CommandFailed(f"{what}: {detail}", status)
        return lines

    async def _run_step(
        self,
        job: BuildJob,
        sandbox: BuildSandbox,
        step: Step,
        number: str,
        prefix: str,
        context: BuildContext,
    ) -> BuildContext:
        try:
            if isinstance(step, Run):
                await self._run(job, sandbox, step, number, prefix, context)
                return context
            if isinstance(step, Copy):
                await self._copy(job, sandbox, step, number, prefix, context)
                return context
            if isinstance(step, Workdir):
                return await self._workdir(job, sandbox, step, number, prefix, context)
            if isinstance(step, User):
                return await self._user_step(job, sandbox, step, number, prefix, context)
            assert isinstance(step, Env)
            return await self._env(sandbox, step, context)
        except CommandFailed as exc:
            raise StepFailed(exc.message, number) from None
        except CorralError as exc:
            raise StepFailed(f"{step.kind} failed: {exc.message}", number) from None

    async def _run(
        self, job: BuildJob, sandbox: BuildSandbox, step: Run, number: str, prefix: str, context: BuildContext
    ) -> None:
        user = self._user(sandbox, step.user or context.user, step.cmd)
        try:
            status = await sandbox.run(
                step.cmd,
                user=user,
                cwd=context.workdir,
                env=context.env_dict(),
                on_output=self._sink(job, prefix, number),
                timeout_s=STEP_TIMEOUT_S,
            )
        except CommandFailed as exc:
            raise CommandFailed(f"failed to run command '{step.cmd}': {exc.message}") from None
        if status.exit_code != 0 or status.signal is not None:
            raise CommandFailed(f"failed to run command '{step.cmd}': {status.status}", status)

    async def _copy(
        self,
        job: BuildJob,
        sandbox: BuildSandbox,
        step: Copy,
        number: str,
        prefix: str,
        context: BuildContext,
    ) -> None:
        if not step.files_hash:
            raise CommandFailed("COPY requires files hash to be set")
        archive = self._uploads.path(job.scope, step.files_hash)
        if not archive.is_file():
            raise CommandFailed(
                f"the files of COPY {step.src} (hash {step.files_hash[:12]}) were not uploaded; upload them first"
            )
        staging = f"/tmp/.corral-copy-{secrets.token_hex(8)}"
        await asyncio.to_thread(sandbox.root.makedirs, "/tmp", 0o1777)
        await asyncio.to_thread(sandbox.root.mkdir, staging, 0o700, uid=0, gid=0)
        await asyncio.to_thread(sandbox.put_file, archive, f"{staging}/files.tar")
        owner = step.user or context.user
        if ":" not in owner:
            owner = f"{owner}:{owner}"
        env = context.env_dict()
        env.update(
            CORRAL_STAGING=staging,
            CORRAL_SOURCE=split_copy_source(step.src),
            CORRAL_TARGET=step.dest,
            CORRAL_OWNER=owner,
            CORRAL_MODE=f"{step.mode:04o}" if step.mode is not None else "",
            CORRAL_WORKDIR=context.workdir or "",
            CORRAL_USER=context.user,
        )
        await self._as_root(
            job, sandbox, COPY_SCRIPT, env, prefix, number, f"failed to copy files to {step.dest}"
        )

    async def _workdir(
        self,
        job: BuildJob,
        sandbox: BuildSandbox,
        step: Workdir,
        number: str,
        prefix: str,
        context: BuildContext,
    ) -> BuildContext:
        target = step.path if step.path.startswith("/") else posixpath.join(context.workdir or "/", step.path)
        target = posixpath.normpath(target)
        env = {"CORRAL_TARGET": target, "CORRAL_USER": context.user}
        lines = await self._as_root(
            job, sandbox, WORKDIR_SCRIPT, env, prefix, number, "failed to create workdir"
        )
        resolved = next((line for line in reversed(lines) if line.startswith("/")), target)
        return dataclasses.replace(context, workdir=resolved)

    async def _user_step(
        self,
        job: BuildJob,
        sandbox: BuildSandbox,
        step: User,
        number: str,
        prefix: str,
        context: BuildContext,
    ) -> BuildContext:
        env = {"CORRAL_NAME": step.name, "CORRAL_SUDO": "true" if step.sudo else "false"}
        await self._as_root(job, sandbox, USER_SCRIPT, env, prefix, number, "failed to create user")
        return dataclasses.replace(context, user=step.name)

    async def _env(self, sandbox: BuildSandbox, step: Env, context: BuildContext) -> BuildContext:
        root = sandbox.user("root")
        values = {}
        for name, value in step.values:
            values[name] = await sandbox.output_of(_env_printf(value), user=root) if "$" in value else value
        return context.with_env(values)

    # -- finishing ---------------------------------------------------------------------------------

    async def _finalize(
        self,
        job: BuildJob,
        parent_key: str,
        layers: tuple[str, ...],
        context: BuildContext,
        start_cmd: str | None,
        ready_cmd: str | None,
        forced: bool,
    ) -> BuildContext:
        key = finalize_key(parent_key, start_cmd, ready_cmd)
        entry = None if forced else self._cached(job, key)
        if entry is not None:
            job.log.add(f"CACHED [finalize] Finalizing template build [{key[:12]}]", "info", "finalize")
            return entry.context
        job.log.add(f"[finalize] Finalizing template build [{key[:12]}]", "info", "finalize")
        if context.workdir is None or start_cmd or ready_cmd:
            sandbox = await self._open(job, layers, "finalize")
            try:
                context = await self._finish_in(job, sandbox, context, start_cmd, ready_cmd)
            finally:
                await sandbox.close()
        self._cache.put(key, CacheEntry(layers=layers, context=context))
        return context

    async def _finish_in(
        self,
        job: BuildJob,
        sandbox: BuildSandbox,
        context: BuildContext,
        start_cmd: str | None,
        ready_cmd: str | None,
    ) -> BuildContext:
        try:
            user = sandbox.user(context.user)
        except CorralError as exc:
            raise StepFailed(f"the template's default user: {exc.code}: {exc.message}", "finalize") from None
        if context.workdir is None:
            context = dataclasses.replace(context, workdir=user.home)
        if not (start_cmd or ready_cmd):
            return context
        sink = self._sink(job, "finalize", "finalize")
        start_task: asyncio.Task[ExitStatus] | None = None
        if start_cmd:
            job.log.add(f"Running start command: {start_cmd}", "info", "finalize")
            start_task = asyncio.create_task(
                sandbox.run(start_cmd, user=user, cwd=context.workdir, env=context.env_dict(), on_output=sink)
            )

        def start_status() -> ExitStatus | None:
            if start_task is None or not start_task.done():
                return None
            if start_task.exception() is not None:
                return ExitStatus(exit_code=-1)
            return start_task.result()

        async def check_ready() -> bool:
            if not ready_cmd:
                return True
            status = await sandbox.run(ready_cmd, user=user, cwd=context.workdir, env=context.env_dict())
            return status.exit_code == 0

        if ready_cmd:
            job.log.add(f"Waiting for template to be ready: {ready_cmd}", "info", "finalize")
        try:
            await wait_until_ready(check_ready, start_status, timeout_s=READY_TIMEOUT_S)
        except TemplateNotReady as exc:
            raise StepFailed(exc.message, "finalize") from None
        except CommandFailed as exc:
            raise StepFailed(f"ready command failed: {exc.message}", "finalize") from None
        finally:
            if start_task is not None:
                start_task.cancel()
                with contextlib.suppress(BaseException):
                    await start_task
        job.log.add("Template is ready", "info", "finalize")
        return context

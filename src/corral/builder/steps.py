"""The build IR: a template build is a `BuildPlan` — one base (`FromTemplate` / `FromImage`), typed
steps (`Run`, `Copy`, `Env`, `Workdir`, `User`) and an optional start/ready command.

Everything here is pure data with no I/O, shared by the server (which executes plans), the
Dockerfile parser and `to_dockerfile`, and Corral's SDK (which sends plans in E2B's wire shape).

    plan = plan_from_e2b(body)         # POST /v2/templates/{id}/builds/{buildID} body → plan
    body = plan_to_e2b(plan)           # and back (what an SDK sends)

Each step knows its `kind` (E2B's instruction type), its `spec()` — the normalised fields that
decide what it produces, used for its cache key (`corral.builder.cache`) — and how it reads in logs
(`describe()`, E2B's `RUN echo hi` style). Executing a step is the executor's job
(`corral.builder.executor`), not the IR's: the IR must stay importable by the SDK, which has no node.

`force` marks a step whose cache must not be used (the SDK's `skip_cache()`); like E2B, a forced
step forces every step after it (`BuildPlan.forced_from`).
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
from collections.abc import Mapping
from typing import Any, ClassVar

from corral.core.errors import InvalidArgument

__all__ = [
    "BASE_IMAGE_ALIASES",
    "DEFAULT_READY_WAIT_CMD",
    "Base",
    "BuildContext",
    "BuildPlan",
    "Copy",
    "Env",
    "FromImage",
    "FromTemplate",
    "Run",
    "Step",
    "User",
    "Workdir",
    "plan_from_e2b",
    "plan_to_e2b",
    "split_copy_source",
    "step_from_e2b",
]

FILES_HASH_RE = re.compile(r"^[0-9a-f]{64}$")
# `from_base_image()` in the E2B SDKs asks for E2B's own base image; ours is the `base` template.
BASE_IMAGE_ALIASES = frozenset({"e2bdev/base", "e2bdev/base:latest", "docker.io/e2bdev/base"})
# What E2B waits for when a template has a start command but no ready command.
DEFAULT_READY_WAIT_CMD = "sleep 20"
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MAX_ARG = 1 << 20  # one step argument (a RUN script) may be up to 1 MiB


@dataclasses.dataclass(frozen=True, slots=True)
class BuildContext:
    """What the steps so far decided for the steps after them (and for the template's sandboxes).

    `workdir` None means "the user's home", as in E2B (a `WORKDIR` sets it).
    """

    user: str = "root"
    workdir: str | None = None
    env: tuple[tuple[str, str], ...] = ()

    def env_dict(self) -> dict[str, str]:
        return dict(self.env)

    def with_env(self, values: Mapping[str, str]) -> BuildContext:
        merged = dict(self.env)
        merged.update(values)
        return dataclasses.replace(self, env=tuple(merged.items()))

    def to_json(self) -> dict[str, Any]:
        return {"user": self.user, "workdir": self.workdir, "env": [list(p) for p in self.env]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BuildContext:
        return cls(
            user=str(data.get("user") or "root"),
            workdir=data.get("workdir"),
            env=tuple((str(k), str(v)) for k, v in data.get("env") or ()),
        )


# -- bases -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class FromTemplate:
    """Start from another template's layers and defaults (`from_template`, `FROM <template>`)."""

    template: str  # id, name or name:tag

    def describe(self) -> str:
        return f"FROM TEMPLATE {self.template}"


@dataclasses.dataclass(frozen=True, slots=True)
class FromImage:
    """Start from an image reference (`from_image`, `FROM debian:bookworm`).

    `registry` is E2B's `fromImageRegistry` (`{"type": "registry", "username", "password"}` or the
    aws/gcp variants). It holds credentials: it never enters a cache key, a log or a repr.
    """

    image: str
    registry: Mapping[str, str] | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def is_base_alias(self) -> bool:
        return self.image in BASE_IMAGE_ALIASES

    def describe(self) -> str:
        return f"FROM {self.image}"


Base = FromTemplate | FromImage


# -- steps -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Run:
    """`RUN cmd` as `user` (None: the context's user), through `bash -l -c` like E2B."""

    kind: ClassVar[str] = "RUN"
    cmd: str
    user: str | None = None
    force: bool = dataclasses.field(default=False, compare=False)

    def spec(self) -> dict[str, Any]:
        return {"cmd": self.cmd, "user": self.user}

    def describe(self) -> str:
        return f"RUN {self.cmd}" + (f" (as {self.user})" if self.user else "")

    def e2b_args(self) -> list[str]:
        return [self.cmd, self.user] if self.user else [self.cmd]


@dataclasses.dataclass(frozen=True, slots=True)
class Copy:
    """`COPY src dest`: the uploaded archive `files_hash` (the client's digest of the sources,
    paths relative to its context dir) is unpacked and `src`'s entry moved to `dest` (relative to
    the workdir), owned by `user` (`name` or `name:group`; None: the context's user), `mode` applied.
    """

    kind: ClassVar[str] = "COPY"
    src: str
    dest: str
    user: str | None = None
    mode: int | None = None
    files_hash: str | None = None
    force: bool = dataclasses.field(default=False, compare=False)
    force_upload: bool = dataclasses.field(default=False, compare=False)

    def spec(self) -> dict[str, Any]:
        return {"src": self.src, "dest": self.dest, "user": self.user, "mode": self.mode}

    def describe(self) -> str:
        return f"COPY {self.src} {self.dest}"

    def e2b_args(self) -> list[str]:
        return [self.src, self.dest, self.user or "", f"{self.mode:04o}" if self.mode is not None else ""]


@dataclasses.dataclass(frozen=True, slots=True)
class Env:
    """`ENV K=V ...`: metadata only. A value with `$` is expanded by a shell in the build sandbox
    (E2B evaluates `printf "%s" "<value>"`), so `PATH=/opt/bin:$PATH` works."""

    kind: ClassVar[str] = "ENV"
    values: tuple[tuple[str, str], ...]
    force: bool = dataclasses.field(default=False, compare=False)

    def spec(self) -> dict[str, Any]:
        return {"values": [list(pair) for pair in self.values]}

    def describe(self) -> str:
        return "ENV " + " ".join(f"{k}={v}" for k, v in self.values)

    def e2b_args(self) -> list[str]:
        return [item for pair in self.values for item in pair]

    @property
    def needs_shell(self) -> bool:
        return any("$" in value for _, value in self.values)


@dataclasses.dataclass(frozen=True, slots=True)
class Workdir:
    """`WORKDIR path`: created (owned by the context's user) if missing; relative to the previous one."""

    kind: ClassVar[str] = "WORKDIR"
    path: str
    force: bool = dataclasses.field(default=False, compare=False)

    def spec(self) -> dict[str, Any]:
        return {"path": self.path}

    def describe(self) -> str:
        return f"WORKDIR {self.path}"

    def e2b_args(self) -> list[str]:
        return [self.path]


@dataclasses.dataclass(frozen=True, slots=True)
class User:
    """`USER name`: created (`useradd -m`) if missing; `sudo` also gives it passwordless sudo."""

    kind: ClassVar[str] = "USER"
    name: str
    sudo: bool = False
    force: bool = dataclasses.field(default=False, compare=False)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "sudo": self.sudo}

    def describe(self) -> str:
        return f"USER {self.name}"

    def e2b_args(self) -> list[str]:
        return [self.name, "true"] if self.sudo else [self.name]


Step = Run | Copy | Env | Workdir | User


@dataclasses.dataclass(frozen=True, slots=True)
class BuildPlan:
    """A whole build. `force` forces everything (the SDK's `Template.build(skip_cache=True)`)."""

    base: Base
    steps: tuple[Step, ...] = ()
    start_cmd: str | None = None
    ready_cmd: str | None = None
    force: bool = False

    def forced_from(self) -> int | None:
        """Index (0-based) of the first forced step: it and every later step skip the cache."""
        if self.force:
            return 0
        return next((i for i, step in enumerate(self.steps) if step.force), None)

    def copy_hashes(self) -> list[str]:
        return [s.files_hash for s in self.steps if isinstance(s, Copy) and s.files_hash]


# -- E2B wire shape ----------------------------------------------------------------------------------


def _str(value: Any, what: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string")
    if not allow_empty and not value:
        raise InvalidArgument(f"{what} must not be empty")
    if len(value) > _MAX_ARG or "\x00" in value:
        raise InvalidArgument(f"{what} is too long or contains a NUL byte")
    return value


def _user_name(value: str, what: str) -> str:
    # Names go into shell scripts quoted, but they must still be valid account names.
    if not re.match(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,31})?$", value):
        raise InvalidArgument(f"{what}: invalid user name {value!r}")
    return value


def _parse_mode(value: str, index: int) -> int | None:
    if value == "":
        return None
    if not re.match(r"^0?[0-7]{1,4}$", value):
        raise InvalidArgument(f"step {index}: COPY mode must be octal like 0755, got {value!r}")
    return int(value, 8)


def step_from_e2b(data: Mapping[str, Any], index: int) -> Step:
    """One `TemplateStep` (`{"type","args","force","filesHash","forceUpload"}`) → a typed step."""
    if not isinstance(data, Mapping):
        raise InvalidArgument(f"step {index} must be an object")
    kind = str(data.get("type", "")).upper()
    raw_args = data.get("args") or []
    if not isinstance(raw_args, list):
        raise InvalidArgument(f"step {index}: args must be a list of strings")
    args = [_str(a, f"step {index} argument", allow_empty=True) for a in raw_args]
    force = bool(data.get("force") or False)
    where = f"step {index} ({kind})"
    if kind == "RUN":
        if not args or not args[0].strip():
            raise InvalidArgument(f"{where}: RUN requires a command")
        user = _user_name(args[1], where) if len(args) > 1 and args[1] else None
        return Run(cmd=args[0], user=user, force=force)
    if kind in ("COPY", "ADD"):
        if len(args) < 2 or not args[0] or not args[1]:
            raise InvalidArgument(f"{where}: COPY requires a source and a destination")
        normalized = posixpath.normpath(args[0])
        if args[0].startswith("/") or normalized == ".." or normalized.startswith("../"):
            raise InvalidArgument(
                f"{where}: COPY source {args[0]!r} must be a relative path inside the context"
            )
        files_hash = data.get("filesHash")
        if files_hash is not None and not (isinstance(files_hash, str) and FILES_HASH_RE.match(files_hash)):
            raise InvalidArgument(f"{where}: filesHash must be 64 hex characters")
        user = _user_name(args[2], where) if len(args) > 2 and args[2] else None
        mode = _parse_mode(args[3], index) if len(args) > 3 else None
        return Copy(
            src=args[0],
            dest=args[1],
            user=user,
            mode=mode,
            files_hash=files_hash,
            force=force,
            force_upload=bool(data.get("forceUpload") or False),
        )
    if kind in ("ENV", "ARG"):
        if not args or len(args) % 2:
            raise InvalidArgument(f"{where}: ENV requires key and value pairs")
        pairs = tuple((args[i], args[i + 1]) for i in range(0, len(args), 2))
        for key, _ in pairs:
            if not _ENV_NAME_RE.match(key):
                raise InvalidArgument(f"{where}: invalid environment variable name {key!r}")
        return Env(values=pairs, force=force)
    if kind == "WORKDIR":
        if not args or not args[0].strip():
            raise InvalidArgument(f"{where}: WORKDIR requires a path")
        return Workdir(path=args[0].strip(), force=force)
    if kind == "USER":
        if not args or not args[0]:
            raise InvalidArgument(f"{where}: USER requires a user name")
        return User(name=_user_name(args[0], where), sudo=len(args) > 1 and args[1] == "true", force=force)
    raise InvalidArgument(f"step {index}: unknown instruction type {data.get('type')!r}")


def plan_from_e2b(body: Mapping[str, Any]) -> BuildPlan:
    """The body of `POST /v2/templates/{id}/builds/{buildID}` (E2B `TemplateBuildStartV2`)."""
    from_image = body.get("fromImage")
    from_template = body.get("fromTemplate")
    base: Base
    if from_template:
        base = FromTemplate(_str(from_template, "fromTemplate"))
    elif from_image:
        registry = body.get("fromImageRegistry")
        if registry is not None and not isinstance(registry, Mapping):
            raise InvalidArgument("fromImageRegistry must be an object")
        base = FromImage(
            _str(from_image, "fromImage"),
            registry={str(k): str(v) for k, v in registry.items()} if registry else None,
        )
    else:
        raise InvalidArgument("a build needs fromImage or fromTemplate")
    raw_steps = body.get("steps") or []
    if not isinstance(raw_steps, list):
        raise InvalidArgument("steps must be a list")
    steps = tuple(step_from_e2b(step, i + 1) for i, step in enumerate(raw_steps))
    start_cmd = body.get("startCmd") or None
    ready_cmd = body.get("readyCmd") or None
    return BuildPlan(
        base=base,
        steps=steps,
        start_cmd=_str(start_cmd, "startCmd") if start_cmd else None,
        ready_cmd=_str(ready_cmd, "readyCmd") if ready_cmd else None,
        force=bool(body.get("force") or False),
    )


def plan_to_e2b(plan: BuildPlan) -> dict[str, Any]:
    """A plan in E2B's `TemplateBuildStartV2` shape (what an SDK posts)."""
    steps: list[dict[str, Any]] = []
    for step in plan.steps:
        item: dict[str, Any] = {"type": step.kind, "args": step.e2b_args(), "force": step.force}
        if isinstance(step, Copy):
            if step.files_hash:
                item["filesHash"] = step.files_hash
            if step.force_upload:
                item["forceUpload"] = True
        steps.append(item)
    body: dict[str, Any] = {"steps": steps, "force": plan.force}
    if isinstance(plan.base, FromTemplate):
        body["fromTemplate"] = plan.base.template
    else:
        body["fromImage"] = plan.base.image
        if plan.base.registry:
            body["fromImageRegistry"] = dict(plan.base.registry)
    if plan.start_cmd:
        body["startCmd"] = plan.start_cmd
    if plan.ready_cmd:
        body["readyCmd"] = plan.ready_cmd
    return body


def split_copy_source(src: str) -> str:
    """The part of a COPY source before its first glob (doublestar's `SplitPattern`, as E2B uses).

    The client archives the matched files with paths relative to its context dir; the server
    moves this base out of the unpacked archive: `folder/*` → `folder`, `*.txt` → `.`, `a/b.txt` → `a/b.txt`.
    """
    pattern = src if src.endswith("/") else src + "/"
    split = -1
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            i += 1
        elif char == "/":
            split = i
        elif char in "*?[{":
            break
        i += 1
    if split == 0:
        return "/"
    if split > 0:
        base = pattern[:split]
        return posixpath.normpath(base) if base not in (".", "") else "."
    return "."

"""Template manifests on disk: what a template is made of and how big its sandboxes are.

A template is an ordered stack of read-only layer directories (lowest first) that become the
`lowerdir`s of each sandbox's overlay, plus the defaults a sandbox of it starts with. Each template
is one JSON file, `templates_dir/<template_id>.json`, written atomically (temp file + `os.replace`),
so a reader never sees half a manifest and the server can read them without a database.

Layers live in `layers_dir/<digest>`, named by a sha256 digest of whatever produced them (a recipe
or a build step's cache key), so the same content is never built or stored twice.

Builds and tags (E2B's model): a template has builds; tags name builds (`name:tag`, `default` when a
ref has no tag). The manifest's top-level fields are its latest build; `tags` maps tag → build id,
and `tagged_builds` keeps the fields of older builds some tag still points at. `get("name:v1")`
returns the manifest as that build (`for_build`). `all_layers()` is every layer any build needs.
Defaults for sandboxes of the template: `default_user`, `default_workdir`, `env_vars`, and
`start_cmd` / `ready_cmd` (started at create, ready when the ready command passes). `runtime` names
the OCI runtime its sandboxes run on (`runsc` …; None = the server's default); it belongs to the
template, set by its latest build, not to each build.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import tempfile
import uuid
from pathlib import Path
from typing import Any, ClassVar

from corral.core.errors import AlreadyExists, Internal, InvalidArgument, NotFound
from corral.core.settings import Settings

__all__ = [
    "DEFAULT_TAG",
    "TemplateManifest",
    "TemplateStore",
    "is_layer_digest",
    "new_build_id",
    "now_rfc3339",
    "parse_template_ref",
]

DEFAULT_TAG = "default"

# Template ids become file names, so they are kept to a safe alphabet (E2B ids are [a-z0-9]).
_TEMPLATE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_LAYER_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")


def now_rfc3339() -> str:
    """The current UTC time as RFC 3339 with a `Z` suffix, e.g. `2025-05-20T10:11:12.345Z`."""
    now = datetime.datetime.now(datetime.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def new_build_id() -> str:
    return str(uuid.uuid4())


def is_layer_digest(value: str) -> bool:
    return bool(_LAYER_DIGEST_RE.match(value))


def parse_template_ref(ref: str) -> tuple[str, str]:
    """Split `name[:tag]` into (name, tag); the tag defaults to `default`."""
    name, sep, tag = ref.partition(":")
    return name, (tag if sep else DEFAULT_TAG)


@dataclasses.dataclass(frozen=True, slots=True)
class TemplateManifest:
    template_id: str
    names: tuple[str, ...]
    layers: tuple[str, ...]  # layer digests, lowest first; each is a read-only dir layers_dir/<digest>
    cpu_count: int = 2
    memory_mb: int = 512
    disk_size_mb: int = 2048
    default_user: str = "user"
    default_workdir: str | None = None  # None: processes without a cwd start in the user's home
    created_at: str = dataclasses.field(default_factory=now_rfc3339)
    build_id: str = dataclasses.field(default_factory=new_build_id)
    # Env vars every process of the template's sandboxes gets (below create-time envVars).
    env_vars: dict[str, str] = dataclasses.field(default_factory=dict)
    start_cmd: str | None = None  # started in the background at sandbox create
    ready_cmd: str | None = None  # the sandbox is ready once this exits 0
    team_id: str | None = None  # owner; None: a system template every team may use (base)
    updated_at: str | None = None
    tags: dict[str, str] = dataclasses.field(default_factory=dict)  # tag → build id
    tagged_builds: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # build id → fields
    runtime: str | None = None  # OCI runtime of its sandboxes (crun, runc, runsc); None: the server's

    # The fields that differ per build (what `tagged_builds` keeps for older builds).
    BUILD_FIELDS: ClassVar[tuple[str, ...]] = (
        "layers",
        "cpu_count",
        "memory_mb",
        "disk_size_mb",
        "default_user",
        "default_workdir",
        "created_at",
        "build_id",
        "env_vars",
        "start_cmd",
        "ready_cmd",
    )

    def __post_init__(self) -> None:
        if not _TEMPLATE_ID_RE.match(self.template_id):
            raise InvalidArgument(f"invalid template id {self.template_id!r}")
        for digest in self.all_layers():
            if not is_layer_digest(digest):
                raise InvalidArgument(f"invalid layer digest {digest!r} in template '{self.template_id}'")

    @property
    def public(self) -> bool:
        return self.team_id is None

    def build_fields(self) -> dict[str, Any]:
        fields = {name: getattr(self, name) for name in self.BUILD_FIELDS}
        fields["layers"] = list(self.layers)
        fields["env_vars"] = dict(self.env_vars)
        return fields

    def for_build(self, build_id: str) -> TemplateManifest:
        """The manifest as build `build_id` (the latest one or a tagged older one)."""
        if build_id == self.build_id:
            return self
        fields = self.tagged_builds.get(build_id)
        if fields is None:
            raise NotFound(f"build '{build_id}' of template '{self.template_id}' not found")
        values = {name: fields[name] for name in self.BUILD_FIELDS if name in fields}
        values["layers"] = tuple(values.get("layers", ()))
        return dataclasses.replace(self, **values)

    def for_tag(self, tag: str) -> TemplateManifest:
        """The build a tag names; `default` without such a tag is the latest build."""
        build_id = self.tags.get(tag)
        if build_id is None:
            if tag == DEFAULT_TAG:
                return self
            raise NotFound(f"template '{self.template_id}:{tag}' not found")
        return self.for_build(build_id)

    def all_layers(self) -> tuple[str, ...]:
        """Every layer the latest build or any tagged build needs (what GC must keep)."""
        found = list(self.layers)
        for fields in self.tagged_builds.values():
            found.extend(d for d in fields.get("layers", ()) if d not in found)
        return tuple(found)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TemplateManifest:
        # Unknown keys are ignored so that a newer server's manifests stay readable by an older one.
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["names"] = tuple(values.get("names", ()))
        values["layers"] = tuple(values.get("layers", ()))
        for name in ("env_vars", "tags", "tagged_builds"):
            if values.get(name) is None:
                values.pop(name, None)
        return cls(**values)


class TemplateStore:
    """Reads and writes template manifests under `settings.templates_dir`."""

    def __init__(self, settings: Settings) -> None:
        self._templates_dir = settings.templates_dir
        self._layers_dir = settings.layers_dir

    def layer_path(self, digest: str) -> Path:
        if not is_layer_digest(digest):
            raise InvalidArgument(f"invalid layer digest {digest!r}")
        return self._layers_dir / digest

    def list(self) -> list[TemplateManifest]:
        """All templates, oldest first."""
        if not self._templates_dir.is_dir():
            return []
        manifests = [
            self._read(path)
            for path in self._templates_dir.glob("*.json")
            if _TEMPLATE_ID_RE.match(path.stem)  # skips `.tmp-*` files of a write in progress
        ]
        return sorted(manifests, key=lambda m: (m.created_at, m.template_id))

    def get(self, id_or_name: str) -> TemplateManifest:
        """Look a template up by id or name, with an optional `:tag` (the build that tag names)."""
        name, tag = parse_template_ref(id_or_name)
        manifest = self.find(name)
        if manifest is not None:
            try:
                return manifest.for_tag(tag)
            except NotFound:
                pass
        raise NotFound(f"template '{id_or_name}' not found")

    def find(self, id_or_name: str) -> TemplateManifest | None:
        """The template with this id or name (no tag), as its latest build; None if there is none."""
        if not id_or_name:
            return None
        if _TEMPLATE_ID_RE.match(id_or_name):
            path = self._templates_dir / f"{id_or_name}.json"
            if path.is_file():
                return self._read(path)
        for manifest in self.list():
            if id_or_name in manifest.names:
                return manifest
        return None

    def save(self, manifest: TemplateManifest) -> None:
        """Write (or replace) a manifest atomically. A name belongs to one template only."""
        for other in self.list():
            if other.template_id != manifest.template_id:
                taken = set(other.names) & set(manifest.names)
                if taken:
                    raise AlreadyExists(
                        f"template name '{min(taken)}' is already used by template '{other.template_id}'"
                    )
        self._templates_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = self._templates_dir / f"{manifest.template_id}.json"
        fd, tmp = tempfile.mkstemp(dir=self._templates_dir, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(manifest.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def delete(self, template_id: str) -> None:
        """Remove a template's manifest (its layers stay: other templates may share them)."""
        if not _TEMPLATE_ID_RE.match(template_id):
            raise NotFound(f"template '{template_id}' not found")
        try:
            (self._templates_dir / f"{template_id}.json").unlink()
        except FileNotFoundError:
            raise NotFound(f"template '{template_id}' not found") from None

    @staticmethod
    def _read(path: Path) -> TemplateManifest:
        try:
            return TemplateManifest.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError, AttributeError, InvalidArgument) as e:
            raise Internal(f"template manifest {path} is unreadable: {e}") from e

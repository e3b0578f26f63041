"""The fluent template builder shared by `Template` and `AsyncTemplate` (E2B's, name for name).

    template = (
        Template()                                  # or AsyncTemplate(): the same builder
        .from_python_image("3.11")                  # a base: an image, a template or a Dockerfile
        .apt_install("curl")
        .copy("app/", "/home/user/app/")            # files from the file context directory
        .set_envs({"MODE": "prod"})
        .set_start_cmd("python -m http.server 8000", wait_for_port(8000))
    )
    print(template.to_dockerfile())
    Template.build(template, "my-app:v1")           # the I/O lives in the twins

The builder records the build IR of `corral.builder.steps` (`BuildPlan`: one base, typed
`Run`/`Copy`/`Env`/`Workdir`/`User` steps, start/ready command) plus what only the client needs:
where each step was added (to name it when it fails), and how each COPY's files are found and
packed. `prepare_build` turns it into what the twins send: the plan with every COPY's `filesHash`,
its E2B wire body, and the uploads. Nothing here talks to the network; `prepare_build` reads the
COPY sources from disk.

Like E2B's SDK, `from_*` return a `TemplateBuilder` (the steps), `set_start_cmd`/`set_ready_cmd`
a `TemplateFinal` (nothing more to add), and `skip_cache()` forces the next step and every step
after it to be built again (before `from_*`: everything).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Literal, NotRequired, TypedDict

from corral.builder.dockerfile import parse_dockerfile, to_dockerfile
from corral.builder.steps import (
    Base,
    BuildPlan,
    Copy,
    Env,
    FromImage,
    FromTemplate,
    Run,
    Step,
    User,
    Workdir,
    plan_from_e2b,
    plan_to_e2b,
)
from corral.core.errors import InvalidArgument
from corral.sdk._dual import dual_method
from corral.sdk._errors import InvalidArgumentException
from corral.sdk._template_api import BuildException, BuildStatusReason, FileUploadException
from corral.sdk._template_files import check_copy_source, files_hash, pack_files, read_dockerignore

__all__ = [
    "DEFAULT_BASE_IMAGE",
    "CopyItem",
    "CopyUpload",
    "PreparedBuild",
    "ReadyCmd",
    "TemplateBase",
    "TemplateBuilder",
    "TemplateClass",
    "TemplateFinal",
    "build_failure",
    "prepare_build",
    "template_of",
    "wait_for_file",
    "wait_for_port",
    "wait_for_process",
    "wait_for_timeout",
    "wait_for_url",
]

DEFAULT_BASE_IMAGE = "e2bdev/base"  # what E2B's SDKs start from; Corral serves it with `base`
_SDK_DIR = Path(__file__).resolve().parent
_PACKAGE_DIR = _SDK_DIR.parent


# -- ready commands ---------------------------------------------------------------------------------


class ReadyCmd:
    """A shell command that exits 0 once a sandbox of the template is ready (see `wait_for_*`)."""

    def __init__(self, cmd: str) -> None:
        self._cmd = cmd

    def get_cmd(self) -> str:
        """The command."""
        return self._cmd

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ReadyCmd) and other._cmd == self._cmd

    def __hash__(self) -> int:
        return hash(self._cmd)

    def __repr__(self) -> str:
        return f"ReadyCmd({self._cmd!r})"


def wait_for_port(port: int) -> ReadyCmd:
    """Ready when something listens on `port` (TCP or UDP)."""
    return ReadyCmd(f'[ -n "$(ss -Htuln sport = :{int(port)})" ]')


def wait_for_url(url: str, status_code: int = 200) -> ReadyCmd:
    """Ready when `url` answers with `status_code`."""
    return ReadyCmd(
        f'curl -s -o /dev/null -w "%{{http_code}}" {shlex.quote(url)} | grep -q "{int(status_code)}"'
    )


def wait_for_process(process_name: str) -> ReadyCmd:
    """Ready when a process called `process_name` runs."""
    return ReadyCmd(f"pgrep {shlex.quote(process_name)} > /dev/null")


def wait_for_file(filename: str) -> ReadyCmd:
    """Ready when the file `filename` exists."""
    return ReadyCmd(f"[ -f {shlex.quote(filename)} ]")


def wait_for_timeout(timeout: int) -> ReadyCmd:
    """Ready `timeout` milliseconds after the start command started (at least one second)."""
    return ReadyCmd(f"sleep {max(1, int(timeout) // 1000)}")


class CopyItem(TypedDict):
    """One `copy()` for `copy_items()` (E2B's keys)."""

    src: str | os.PathLike[str] | list[str | os.PathLike[str]]
    dest: str | os.PathLike[str]
    forceUpload: NotRequired[Literal[True] | None]
    user: NotRequired[str | None]
    mode: NotRequired[int | None]
    resolveSymlinks: NotRequired[bool | None]
    gzip: NotRequired[bool | None]


# -- where the user added a step --------------------------------------------------------------------


def _inside(filename: str, directory: Path) -> bool:
    return os.path.abspath(filename).startswith(str(directory) + os.sep)


def _caller() -> tuple[str, int] | None:
    """The file and line that called into the SDK; None when Corral itself did (e.g. the CLI)."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            filename = frame.f_code.co_filename
            if not _inside(filename, _SDK_DIR):
                return None if _inside(filename, _PACKAGE_DIR) else (filename, frame.f_lineno)
            frame = frame.f_back
        return None
    finally:
        del frame


def _origin() -> str | None:
    caller = _caller()
    if caller is None:
        return None
    filename, line = caller
    if not filename.startswith("<"):
        relative = os.path.relpath(filename)
        filename = relative if not relative.startswith("..") else filename
    return f"{filename}:{line}"


def _caller_directory() -> Path:
    caller = _caller()
    if caller is not None and os.path.isfile(caller[0]):
        return Path(caller[0]).resolve().parent
    return Path.cwd()


def _short(text: str, limit: int = 80) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit and "\n" not in text.strip() else line[: limit - 1] + "…"


# -- the builder ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _CopyOptions:
    resolve_symlinks: bool = False
    gzip: bool = True


def _invalid(exc: InvalidArgument) -> InvalidArgumentException:
    return InvalidArgumentException(exc.message)


class TemplateBase:
    """A template being described: its base (`from_*`), then steps (`TemplateBuilder`).

    `file_context_path` is the directory `copy()` sources are relative to (default: the directory
    of the file that created the template); `file_ignore_patterns` are left out of every copy, as
    are the patterns of `<file_context_path>/.dockerignore`.
    """

    def __init__(
        self,
        file_context_path: str | os.PathLike[str] | None = None,
        file_ignore_patterns: Sequence[str] | None = None,
    ) -> None:
        self._base: Base = FromImage(DEFAULT_BASE_IMAGE)
        self._base_origin: str | None = None
        self._steps: list[Step] = []
        self._origins: list[str | None] = []
        self._copy_options: dict[int, _CopyOptions] = {}
        self._start_cmd: str | None = None
        self._ready_cmd: str | None = None
        self._finalize_origin: str | None = None
        self._force = False  # everything is built again (skip_cache() before from_*)
        self._force_next_layer = False  # this step and every later one are built again
        self._context_dir = Path(file_context_path) if file_context_path is not None else _caller_directory()
        self._ignore_patterns = list(file_ignore_patterns or ())

    @property
    def file_context_path(self) -> Path:
        """The directory `copy()` sources are relative to."""
        return self._context_dir

    def skip_cache(self) -> TemplateBase:
        """Build everything again, ignoring cached layers (call before `from_*`)."""
        self._force_next_layer = True
        return self

    # -- bases ------------------------------------------------------------------------------------

    def _set_base(self, base: Base) -> TemplateBuilder:
        self._base = base
        self._base_origin = _origin()
        if self._force_next_layer:
            self._force = True
        return TemplateBuilder(self)

    def from_debian_image(self, variant: str = "stable") -> TemplateBuilder:
        """Start from Debian (`debian:<variant>`, e.g. `bookworm`, `12`, `trixie`)."""
        return self.from_image(f"debian:{variant}")

    def from_ubuntu_image(self, variant: str = "latest") -> TemplateBuilder:
        """Start from Ubuntu (`ubuntu:<variant>`, e.g. `24.04`), when the server can reach its archive."""
        return self.from_image(f"ubuntu:{variant}")

    def from_python_image(self, version: str = "3") -> TemplateBuilder:
        """Start from Python (`python:<version>`; Corral serves `3` and `3.11` from Debian's python3)."""
        return self.from_image(f"python:{version}")

    def from_node_image(self, variant: str = "lts") -> TemplateBuilder:
        """Start from Node.js (`node:<variant>`; Corral serves it from Debian's nodejs)."""
        return self.from_image(f"node:{variant}")

    def from_base_image(self) -> TemplateBuilder:
        """Start from E2B's base image (`e2bdev/base`, which Corral serves with its `base` template)."""
        return self.from_image(DEFAULT_BASE_IMAGE)

    def from_image(
        self, image: str, username: str | None = None, password: str | None = None
    ) -> TemplateBuilder:
        """Start from an image reference (`ghcr.io/org/img:tag`); `username`/`password` for a private registry."""
        if not image:
            raise InvalidArgumentException("from_image needs an image reference, e.g. 'debian:bookworm'")
        registry = None
        if username is not None or password is not None:
            if not username or not password:
                raise InvalidArgumentException(
                    "both username and password are required when providing registry credentials"
                )
            registry = {"type": "registry", "username": username, "password": password}
        return self._set_base(FromImage(image, registry=registry))

    def from_template(self, template: str) -> TemplateBuilder:
        """Start from another template (`base`, `name`, `name:tag` or an id), with its files and defaults."""
        if not template:
            raise InvalidArgumentException("from_template needs a template name or id, e.g. 'base'")
        return self._set_base(FromTemplate(template))

    def from_dockerfile(self, dockerfile_content_or_path: str | os.PathLike[str]) -> TemplateBuilder:
        """Start from a Dockerfile (its text, or the path of one): its FROM, steps and CMD/ENTRYPOINT.

        One FROM only; `COPY` sources are relative to this template's file context directory.
        """
        value = os.fspath(dockerfile_content_or_path)
        text = value
        if "\n" not in value and os.path.isfile(value):
            text = Path(value).read_text(encoding="utf-8")
        try:
            plan = parse_dockerfile(text)
        except InvalidArgument as exc:
            raise InvalidArgumentException(f"cannot use this Dockerfile: {exc.message}") from None
        builder = self._set_base(plan.base)
        for step in plan.steps:
            self._add(step)
        if plan.start_cmd or plan.ready_cmd:
            self._start_cmd, self._ready_cmd = plan.start_cmd, plan.ready_cmd
            self._finalize_origin = _origin()
        return builder

    # -- steps ------------------------------------------------------------------------------------

    def _add(self, step: Step, options: _CopyOptions | None = None) -> None:
        if self._force_next_layer and not step.force:
            step = dataclasses.replace(step, force=True)
        if options is not None:
            self._copy_options[len(self._steps)] = options
        self._steps.append(step)
        self._origins.append(_origin())

    def _plan(self, *, force: bool = False) -> BuildPlan:
        return BuildPlan(
            base=self._base,
            steps=tuple(self._steps),
            start_cmd=self._start_cmd,
            ready_cmd=self._ready_cmd,
            force=self._force or force,
        )

    def _describe_step(self, step: str) -> tuple[str | None, str | None]:
        """(what the step is, where it was added) for a server step name."""
        if step == "0":
            return self._base.describe(), self._base_origin
        if step == "finalize":
            parts = []
            if self._start_cmd:
                parts.append(f"start command {_short(self._start_cmd)!r}")
            if self._ready_cmd:
                parts.append(f"ready command {_short(self._ready_cmd)!r}")
            return (" and ".join(parts) or "finishing the template"), self._finalize_origin
        if step.isdigit() and 1 <= int(step) <= len(self._steps):
            index = int(step) - 1
            return _short(self._steps[index].describe()), self._origins[index]
        return None, None

    # -- exports ----------------------------------------------------------------------------------

    def _to_plan(self) -> BuildPlan:
        """The build IR (`corral.builder.steps.BuildPlan`), without the COPY files' hashes.

        On the class: `Template.to_plan(template)`.
        """
        return self._plan()

    @classmethod
    def _to_plan_of(cls, template: TemplateClass | TemplateBase) -> BuildPlan:
        return template_of(template)._plan()

    to_plan = dual_method(_to_plan_of, _to_plan)

    def _to_dockerfile(self) -> str:
        """The template as a Dockerfile (not for templates built on another template).

        On the class: `Template.to_dockerfile(template)`, as in E2B's SDK.
        """
        try:
            return to_dockerfile(self._plan())
        except InvalidArgument as exc:
            raise _invalid(exc) from None

    @classmethod
    def _to_dockerfile_of(cls, template: TemplateClass | TemplateBase) -> str:
        return template_of(template)._to_dockerfile()

    to_dockerfile = dual_method(_to_dockerfile_of, _to_dockerfile)

    def _to_json(self) -> str:
        """The build request body (E2B's `TemplateBuildStartV2`, COPY hashes included) as JSON.

        On the class: `Template.to_json(template)`, as in E2B's SDK.
        """
        return json.dumps(prepare_build(self).body, indent=2)

    @classmethod
    def _to_json_of(cls, template: TemplateClass | TemplateBase) -> str:
        return template_of(template)._to_json()

    to_json = dual_method(_to_json_of, _to_json)


class TemplateFinal:
    """A template with its start command set: ready to build, no more steps."""

    def __init__(self, template: TemplateBase) -> None:
        self._template = template

    def to_plan(self) -> BuildPlan:
        """The build IR, without the COPY files' hashes."""
        return self._template._plan()

    def to_dockerfile(self) -> str:
        """The template as a Dockerfile."""
        return self._template._to_dockerfile()

    def to_json(self) -> str:
        """The build request body as JSON."""
        return self._template._to_json()


def _paths(value: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    if isinstance(value, str | os.PathLike):
        return [os.fspath(value)]
    return [os.fspath(item) for item in value]


def _octal(mode: int | None) -> str:
    return f"{mode:04o}"


class TemplateBuilder:
    """The steps of a template. Every method adds one step (or none) and returns the builder."""

    def __init__(self, template: TemplateBase) -> None:
        self._template = template

    def copy(
        self,
        src: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        dest: str | os.PathLike[str],
        force_upload: Literal[True] | None = None,
        user: str | None = None,
        mode: int | None = None,
        resolve_symlinks: bool | None = None,
        gzip: bool | None = None,
    ) -> TemplateBuilder:
        """Copy files, directories or globs (`src/**/*.py`) from the file context directory to
        `dest` in the template (relative to the working directory), owned by `user` (`name` or
        `name:group`; default: the current user) with `mode` (e.g. `0o755`). Unchanged files are
        not uploaded again unless `force_upload`; symlinks stay links unless `resolve_symlinks`.
        """
        for item in _paths(src):
            try:
                check_copy_source(item)
            except ValueError as exc:
                raise InvalidArgumentException(str(exc)) from None
            step = Copy(
                src=item,
                dest=os.fspath(dest),
                user=user or None,
                mode=mode or None,
                force=bool(force_upload),
                force_upload=bool(force_upload),
            )
            options = _CopyOptions(
                resolve_symlinks=bool(resolve_symlinks), gzip=True if gzip is None else gzip
            )
            self._template._add(step, options)
        return self

    def copy_items(self, items: Sequence[CopyItem]) -> TemplateBuilder:
        """Several `copy()`s at once."""
        for item in items:
            self.copy(
                item["src"],
                item["dest"],
                item.get("forceUpload"),
                item.get("user"),
                item.get("mode"),
                item.get("resolveSymlinks"),
                item.get("gzip"),
            )
        return self

    def run_cmd(self, command: str | Sequence[str], user: str | None = None) -> TemplateBuilder:
        """Run a shell command (`bash -l -c`) as `user` (default: the current user); a list is joined with `&&`."""
        commands = [command] if isinstance(command, str) else list(command)
        joined = " && ".join(commands)
        if not joined.strip():
            raise InvalidArgumentException("run_cmd needs a command")
        self._template._add(Run(cmd=joined, user=user or None))
        return self

    def remove(
        self,
        path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        force: bool = False,
        recursive: bool = False,
        user: str | None = None,
    ) -> TemplateBuilder:
        """Remove files (`rm`; `recursive` for directories, `force` to ignore missing ones)."""
        args = ["rm"] + (["-r"] if recursive else []) + (["-f"] if force else [])
        args += [shlex.quote(p) for p in _paths(path)]
        return self.run_cmd(" ".join(args), user=user)

    def rename(
        self,
        src: str | os.PathLike[str],
        dest: str | os.PathLike[str],
        force: bool = False,
        user: str | None = None,
    ) -> TemplateBuilder:
        """Rename or move a file or directory (`mv`)."""
        args = ["mv", shlex.quote(os.fspath(src)), shlex.quote(os.fspath(dest))] + (["-f"] if force else [])
        return self.run_cmd(" ".join(args), user=user)

    def make_dir(
        self,
        path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        mode: int | None = None,
        user: str | None = None,
    ) -> TemplateBuilder:
        """Create directories with their parents (`mkdir -p`), with `mode` if given."""
        args = ["mkdir", "-p"] + ([f"-m {_octal(mode)}"] if mode else [])
        args += [shlex.quote(p) for p in _paths(path)]
        return self.run_cmd(" ".join(args), user=user)

    def make_symlink(
        self,
        src: str | os.PathLike[str],
        dest: str | os.PathLike[str],
        user: str | None = None,
        force: bool = False,
    ) -> TemplateBuilder:
        """Make `dest` a symbolic link to `src` (`ln -s`; `force` replaces an existing `dest`)."""
        args = ["ln", "-s"] + (["-f"] if force else [])
        args += [shlex.quote(os.fspath(src)), shlex.quote(os.fspath(dest))]
        return self.run_cmd(" ".join(args), user=user)

    def apt_install(
        self, packages: str | Sequence[str], no_install_recommends: bool = False, fix_missing: bool = False
    ) -> TemplateBuilder:
        """Install Debian/Ubuntu packages with apt-get, as root."""
        names = [packages] if isinstance(packages, str) else list(packages)
        if not names:
            raise InvalidArgumentException("apt_install needs at least one package")
        flags = ("--no-install-recommends " if no_install_recommends else "") + (
            "--fix-missing " if fix_missing else ""
        )
        return self.run_cmd(
            [
                "apt-get update",
                f"DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes apt-get install -y {flags}{' '.join(names)}",
            ],
            user="root",
        )

    def pip_install(self, packages: str | Sequence[str] | None = None, g: bool = True) -> TemplateBuilder:
        """`pip install` packages (none: the project in the working directory); `g=False` for the user only."""
        names = [packages] if isinstance(packages, str) else list(packages or ())
        args = ["pip", "install"] + ([] if g else ["--user"]) + (names or ["."])
        return self.run_cmd(" ".join(args), user="root" if g else None)

    def npm_install(
        self, packages: str | Sequence[str] | None = None, g: bool | None = False, dev: bool | None = False
    ) -> TemplateBuilder:
        """`npm install` packages (none: from package.json); `g` globally (as root), `dev` as dev dependencies."""
        names = [packages] if isinstance(packages, str) else list(packages or ())
        args = ["npm", "install"] + (["-g"] if g else []) + (["--save-dev"] if dev else []) + names
        return self.run_cmd(" ".join(args), user="root" if g else None)

    def git_clone(
        self,
        url: str,
        path: str | os.PathLike[str] | None = None,
        branch: str | None = None,
        depth: int | None = None,
        user: str | None = None,
    ) -> TemplateBuilder:
        """Clone a git repository (into `path`), one `branch` only if given, `depth` commits deep."""
        args = ["git", "clone", shlex.quote(url)]
        if branch:
            args += [f"--branch {shlex.quote(branch)}", "--single-branch"]
        if depth:
            args.append(f"--depth {int(depth)}")
        if path:
            args.append(shlex.quote(os.fspath(path)))
        return self.run_cmd(" ".join(args), user=user)

    def set_envs(self, envs: Mapping[str, str]) -> TemplateBuilder:
        """Set environment variables for the later build steps (`$VAR` expands); as in E2B, the
        template's sandboxes do not get them (pass `envs=` to `Sandbox.create`)."""
        if envs:
            self._template._add(Env(values=tuple((str(k), str(v)) for k, v in envs.items())))
        return self

    def set_workdir(self, workdir: str | os.PathLike[str]) -> TemplateBuilder:
        """The working directory of the later steps and of the template's sandboxes (created if missing)."""
        self._template._add(Workdir(path=os.fspath(workdir)))
        return self

    def set_user(self, user: str) -> TemplateBuilder:
        """The user of the later steps and of the template's sandboxes (created if missing)."""
        if not user:
            raise InvalidArgumentException("set_user needs a user name")
        self._template._add(User(name=user))
        return self

    def skip_cache(self) -> TemplateBuilder:
        """Build the next step and every later one again, ignoring cached layers."""
        self._template._force_next_layer = True
        return self

    def set_start_cmd(self, start_cmd: str, ready_cmd: str | ReadyCmd) -> TemplateFinal:
        """Run `start_cmd` when a sandbox of the template starts; it is ready once `ready_cmd` exits 0
        (`wait_for_port(8000)`, ...). The build runs both once and fails if the start command fails."""
        if not start_cmd:
            raise InvalidArgumentException("set_start_cmd needs a command")
        template = self._template
        template._start_cmd = start_cmd
        template._ready_cmd = ready_cmd.get_cmd() if isinstance(ready_cmd, ReadyCmd) else ready_cmd
        template._finalize_origin = _origin()
        return TemplateFinal(template)

    def set_ready_cmd(self, ready_cmd: str | ReadyCmd) -> TemplateFinal:
        """Sandboxes of the template are ready once `ready_cmd` exits 0 (no start command)."""
        template = self._template
        template._ready_cmd = ready_cmd.get_cmd() if isinstance(ready_cmd, ReadyCmd) else ready_cmd
        template._finalize_origin = _origin()
        return TemplateFinal(template)

    def to_plan(self) -> BuildPlan:
        """The build IR, without the COPY files' hashes."""
        return self._template._plan()

    def to_dockerfile(self) -> str:
        """The template as a Dockerfile."""
        return self._template._to_dockerfile()

    def to_json(self) -> str:
        """The build request body as JSON."""
        return self._template._to_json()


TemplateClass = TemplateBuilder | TemplateFinal
"""What `Template.build` takes: the builder after its steps, or after `set_start_cmd`."""


def template_of(template: TemplateClass | TemplateBase) -> TemplateBase:
    """The template behind a builder (or the template itself)."""
    if isinstance(template, TemplateBase):
        return template
    if isinstance(template, TemplateBuilder | TemplateFinal):
        return template._template
    kind = type(template)
    hint = (
        "; import Template from corral instead of e2b (`from corral import Template`)"
        if kind.__module__.split(".")[0] == "e2b"
        else ""
    )
    raise InvalidArgumentException(f"expected a template, got {kind.__module__}.{kind.__qualname__}{hint}")


# -- what a build sends -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class CopyUpload:
    """The files of one COPY step: their digest, and how to pack them for the upload."""

    step: str
    src: str
    files_hash: str
    force_upload: bool
    context_dir: Path
    ignore_patterns: tuple[str, ...]
    resolve_symlinks: bool
    gzip: bool

    def pack(self) -> IO[bytes]:
        """The archive to upload, in a temp file (the caller closes it)."""
        return pack_files(
            self.src,
            self.context_dir,
            self.ignore_patterns,
            resolve_symlinks=self.resolve_symlinks,
            gzip=self.gzip,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class PreparedBuild:
    """A template ready to send: the plan with files hashes, its wire body, the uploads."""

    plan: BuildPlan
    body: dict[str, Any]
    uploads: tuple[CopyUpload, ...]
    template: TemplateBase


def prepare_build(template: TemplateClass | TemplateBase, *, skip_cache: bool = False) -> PreparedBuild:
    """Hash every COPY's files (reads them) and check the plan as the server will.

    `FileUploadException` when a COPY matches no files; `InvalidArgumentException` for a step the
    server would refuse (an invalid user or variable name, ...).
    """
    state = template_of(template)
    ignore = (*state._ignore_patterns, *read_dockerignore(state._context_dir))
    steps: list[Step] = []
    uploads: list[CopyUpload] = []
    for index, step in enumerate(state._steps):
        if isinstance(step, Copy):
            options = state._copy_options.get(index, _CopyOptions())
            number = str(index + 1)
            try:
                digest = files_hash(
                    step.src, step.dest, state._context_dir, ignore, resolve_symlinks=options.resolve_symlinks
                )
            except (ValueError, OSError) as exc:
                instruction, origin = state._describe_step(number)
                raise FileUploadException(
                    f"{exc}{_where(number, len(state._steps), instruction, origin)}",
                    code="invalid_argument",
                    step=number,
                    instruction=instruction,
                    origin=origin,
                ) from None
            step = dataclasses.replace(step, files_hash=digest)
            uploads.append(
                CopyUpload(
                    step=number,
                    src=step.src,
                    files_hash=digest,
                    force_upload=step.force_upload,
                    context_dir=state._context_dir,
                    ignore_patterns=ignore,
                    resolve_symlinks=options.resolve_symlinks,
                    gzip=options.gzip,
                )
            )
        steps.append(step)
    plan = dataclasses.replace(state._plan(force=skip_cache), steps=tuple(steps))
    body = plan_to_e2b(plan)
    try:
        plan_from_e2b(body)  # the server's own checks, here, before anything is sent
    except InvalidArgument as exc:
        raise _invalid(exc) from None
    return PreparedBuild(plan=plan, body=body, uploads=tuple(uploads), template=state)


def _where(step: str, total: int, instruction: str | None, origin: str | None) -> str:
    if step == "0":
        label = "the base"
    elif step == "finalize":
        label = "finalize"
    else:
        label = f"step {step}/{total}"
    details = ", ".join(part for part in (instruction, f"added at {origin}" if origin else None) if part)
    return f" [{label}: {details}]" if details else f" [{label}]"


def build_failure(reason: BuildStatusReason | None, template: TemplateClass | TemplateBase) -> BuildException:
    """A failed build's `BuildException`: the server's message, then which step failed, what it
    is and where the template added it (`… [step 2/3: RUN make, added at build.py:12]`)."""
    message = reason.message if reason is not None and reason.message else "the build failed"
    step = reason.step if reason is not None else None
    if step is None:
        return BuildException(message, code="unknown")
    state = template_of(template)
    instruction, origin = state._describe_step(step)
    return BuildException(
        message + _where(step, len(state._steps), instruction, origin),
        code="unknown",
        step=step,
        instruction=instruction,
        origin=origin,
    )

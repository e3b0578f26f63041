"""Dockerfile ⇄ `BuildPlan` (pure).

    plan = parse_dockerfile(text)                       # E2B's semantics, see below
    text = to_dockerfile(plan)                          # the inverse, for display and export
    parse_dockerfile(to_dockerfile(p), e2b_defaults=False) == p    # for any plan on an image

Supported: one `FROM` (`AS name` and `--platform` ignored), `RUN` (shell form, exec form, and a
heredoc that is the whole command), `COPY`/`ADD` (`--chown`, `--chmod`, several sources, exec form),
`ENV` (`K=V ...` and the legacy `K value`), `ARG` (becomes ENV, as E2B does), `WORKDIR`, `USER`,
`CMD`/`ENTRYPOINT` (the start command; both: ENTRYPOINT then CMD, like Docker) and `HEALTHCHECK CMD`
(the ready command). `EXPOSE`, `LABEL`, `VOLUME`, `STOPSIGNAL`, `SHELL`, `ONBUILD`, `MAINTAINER`
are ignored and reported through `on_ignored`. Multi-stage builds, `COPY --from`, `RUN --mount`,
`ADD <url>` and `FROM scratch` are refused with `InvalidArgument`.

Like E2B's SDK parser, `e2b_defaults=True` brackets the steps with Docker's defaults (`USER root`,
`WORKDIR /`) first and E2B's (`USER user`, `WORKDIR /home/user`) last unless the file sets its own,
and a start command without a HEALTHCHECK waits `sleep 20` (E2B's default ready wait).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from typing import Any

from corral.builder.steps import (
    DEFAULT_READY_WAIT_CMD,
    BuildPlan,
    Copy,
    Env,
    FromImage,
    Run,
    Step,
    User,
    Workdir,
)
from corral.core.errors import InvalidArgument

__all__ = ["parse_dockerfile", "to_dockerfile"]

_IGNORED = frozenset({"EXPOSE", "LABEL", "VOLUME", "STOPSIGNAL", "SHELL", "ONBUILD", "MAINTAINER"})
_HEREDOC_RE = re.compile(r"^<<(-?)(['\"]?)([A-Za-z_][A-Za-z0-9_]*)\2\s*$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Join continuation lines (`\\` at the end) like E2B (`\\ + newline + indent` → one space);
    drop comments and blank lines; a heredoc body is kept verbatim. Returns (line number, text)."""
    escape = "\\"
    lines = text.splitlines()
    for raw in lines:  # parser directives come first: `# escape=` is the only one that matters here
        match = re.match(r"^#\s*escape\s*=\s*(\S)\s*$", raw)
        if match:
            escape = match.group(1)
            continue
        if re.match(r"^#\s*\w+\s*=", raw):
            continue
        break
    out: list[tuple[int, str]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        start = i + 1
        stripped = line.strip()
        i += 1
        if not stripped or stripped.startswith("#"):
            continue
        current = line.rstrip()
        while current.endswith(escape) and i < len(lines):
            current = current[: -len(escape)].rstrip()
            following = lines[i]
            i += 1
            if following.strip().startswith("#"):
                continue
            current = f"{current} {following.strip()}".rstrip()
        if current.endswith(escape):
            current = current[: -len(escape)].rstrip()
        heredoc = _heredoc_marker(current)
        if heredoc is not None:
            strip_tabs, delimiter = heredoc
            body: list[str] = []
            while i < len(lines) and (lines[i].lstrip("\t") if strip_tabs else lines[i]) != delimiter:
                body.append(lines[i].lstrip("\t") if strip_tabs else lines[i])
                i += 1
            if i >= len(lines):
                raise InvalidArgument(f"line {start}: heredoc {delimiter!r} is not terminated")
            i += 1
            current = current + "\n" + "\n".join(body)
        out.append((start, current.strip() if heredoc is None else current.lstrip()))
    return out


def _heredoc_marker(line: str) -> tuple[bool, str] | None:
    parts = line.strip().split(None, 1)
    if len(parts) != 2 or parts[0].upper() != "RUN":
        return None
    match = _HEREDOC_RE.match(parts[1].strip())
    if match is None:
        if re.search(r"<<-?['\"]?[A-Za-z_]", parts[1]):
            raise InvalidArgument("only a heredoc that is the whole RUN command is supported")
        return None
    return match.group(1) == "-", match.group(3)


def _split_flags(args: str) -> tuple[dict[str, str], str]:
    """Leading `--name=value` / `--name` flags of an instruction, and the rest."""
    flags: dict[str, str] = {}
    rest = args.lstrip()
    while rest.startswith("--"):
        word, _, after = rest.partition(" ")
        name, _, value = word[2:].partition("=")
        flags[name.lower()] = value
        rest = after.lstrip()
    return flags, rest


def _json_list(text: str) -> list[str] | None:
    if not text.startswith("["):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return None


def _words(text: str, where: str) -> list[str]:
    lexer = shlex.shlex(text, posix=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    try:
        return list(lexer)
    except ValueError as exc:
        raise InvalidArgument(f"{where}: {exc}") from None


def _command(text: str) -> str:
    exec_form = _json_list(text)
    return shlex.join(exec_form) if exec_form is not None else text


def _env_pairs(args: str, instruction: str, where: str) -> tuple[tuple[str, str], ...]:
    first, _, rest = args.strip().partition(" ")
    if "=" not in first:
        if instruction == "ARG":
            return ((first, ""),) if first else ()
        value = rest.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        return ((first, value),)
    pairs = []
    for word in _words(args, where):
        key, sep, value = word.partition("=")
        if not sep and instruction != "ARG":
            raise InvalidArgument(f"{where}: expected KEY=VALUE, got {word!r}")
        pairs.append((key, value))
    for key, _ in pairs:
        if not _ENV_NAME_RE.match(key):
            raise InvalidArgument(f"{where}: invalid variable name {key!r}")
    return tuple(pairs)


def _copy_steps(args: str, instruction: str, where: str) -> list[Step]:
    flags, rest = _split_flags(args)
    if "from" in flags:
        raise InvalidArgument(f"{where}: COPY --from (multi-stage builds) is not supported")
    paths = _json_list(rest)
    if paths is None:
        paths = _words(rest, where)
    if len(paths) < 2:
        raise InvalidArgument(f"{where}: {instruction} needs at least one source and a destination")
    *sources, dest = paths
    if instruction == "ADD" and any(re.match(r"^[a-z]+://", src) for src in sources):
        raise InvalidArgument(f"{where}: ADD <url> is not supported; download with RUN curl instead")
    mode = None
    if flags.get("chmod"):
        if not re.match(r"^[0-7]{3,4}$", flags["chmod"]):
            raise InvalidArgument(f"{where}: --chmod must be octal, got {flags['chmod']!r}")
        mode = int(flags["chmod"], 8)
    return [Copy(src=src, dest=dest, user=flags.get("chown") or None, mode=mode) for src in sources]


def parse_dockerfile(
    text: str, *, e2b_defaults: bool = True, on_ignored: Callable[[str], Any] | None = None
) -> BuildPlan:
    """Parse a Dockerfile into a plan. COPY steps have no `files_hash` yet (the client adds it)."""
    base: FromImage | None = None
    steps: list[Step] = []
    entrypoint: str | None = None
    cmd: str | None = None
    ready: str | None = None
    user_set = workdir_set = False
    for number, line in _logical_lines(text):
        where = f"line {number}"
        match = re.match(r"^(\S+)[ \t]*(.*)$", line, re.DOTALL)
        assert match is not None  # logical lines are never blank
        instruction, args = match.group(1).upper(), match.group(2)
        args = args.strip() if "\n" not in args else args
        if instruction == "FROM":
            if base is not None:
                raise InvalidArgument(f"{where}: multi-stage Dockerfiles are not supported")
            _, image_args = _split_flags(args)
            words = image_args.split()
            if not words:
                raise InvalidArgument(f"{where}: FROM needs an image")
            if len(words) == 3 and words[1].lower() == "as":
                words = words[:1]
            if len(words) != 1:
                raise InvalidArgument(f"{where}: cannot read FROM {args!r}")
            if words[0] == "scratch":
                raise InvalidArgument(f"{where}: FROM scratch is not supported")
            base = FromImage(words[0])
            continue
        if base is None:
            if instruction == "ARG":
                continue  # ARGs before FROM parameterise FROM; we take FROM literally
            raise InvalidArgument(f"{where}: a Dockerfile must start with FROM")
        if instruction == "RUN":
            flags, rest = _split_flags(args)
            if "mount" in flags:
                raise InvalidArgument(f"{where}: RUN --mount is not supported")
            heredoc = _HEREDOC_RE.match(rest.split("\n", 1)[0].strip()) if "\n" in rest else None
            command = rest.split("\n", 1)[1] if heredoc else _command(rest)
            if command.strip():
                steps.append(Run(cmd=command))
        elif instruction in ("COPY", "ADD"):
            steps.extend(_copy_steps(args, instruction, where))
        elif instruction in ("ENV", "ARG"):
            pairs = _env_pairs(args, instruction, where)
            if pairs:
                steps.append(Env(values=pairs))
        elif instruction == "WORKDIR":
            if not args:
                raise InvalidArgument(f"{where}: WORKDIR needs a path")
            steps.append(Workdir(path=args))
            workdir_set = True
        elif instruction == "USER":
            name = args.split(":", 1)[0].strip()
            if not name:
                raise InvalidArgument(f"{where}: USER needs a name")
            steps.append(User(name=name))
            user_set = True
        elif instruction == "ENTRYPOINT":
            entrypoint = _command(args)
        elif instruction == "CMD":
            cmd = _command(args)
        elif instruction == "HEALTHCHECK":
            _, rest = _split_flags(args)
            keyword, _, probe = rest.partition(" ")
            if keyword.upper() == "CMD" and probe.strip():
                ready = _command(probe.strip())
        elif instruction in _IGNORED:
            if on_ignored is not None:
                on_ignored(f"{where}: {instruction} is ignored")
        else:
            raise InvalidArgument(f"{where}: unknown instruction {instruction}")
    if base is None:
        raise InvalidArgument("a Dockerfile must contain a FROM instruction")
    start = " ".join(part for part in (entrypoint, cmd) if part) or None
    if e2b_defaults:
        steps = [User(name="root"), Workdir(path="/"), *steps]
        if not user_set:
            steps.append(User(name="user"))
        if not workdir_set:
            steps.append(Workdir(path="/home/user"))
        if start and ready is None:
            ready = DEFAULT_READY_WAIT_CMD
    return BuildPlan(base=base, steps=tuple(steps), start_cmd=start, ready_cmd=ready)


def _quote_env(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _paths(*paths: str) -> str:
    if any(not p or any(c.isspace() for c in p) or p[0] in "[\"'" or "\\" in p for p in paths):
        return json.dumps(list(paths))
    return " ".join(paths)


def to_dockerfile(plan: BuildPlan) -> str:
    """The plan as a Dockerfile. A RUN with its own user becomes `USER u` / `RUN` / `USER <before>`;
    multi-line commands become heredocs. Plans on another template have no Dockerfile form."""
    if not isinstance(plan.base, FromImage):
        raise InvalidArgument(
            "a template built from another template cannot be written as a Dockerfile "
            "(its base is not an image)"
        )
    lines = [f"FROM {plan.base.image}"]
    current_user = "root"
    for step in plan.steps:
        if isinstance(step, Run):
            if step.user and step.user != current_user:
                lines.append(f"USER {step.user}")
            if "\n" in step.cmd:
                delimiter = "CORRAL_EOF"
                while delimiter in step.cmd.splitlines():
                    delimiter += "_"
                lines.append(f"RUN <<'{delimiter}'\n{step.cmd}\n{delimiter}")
            else:
                lines.append(f"RUN {step.cmd}")
            if step.user and step.user != current_user:
                lines.append(f"USER {current_user}")
        elif isinstance(step, Copy):
            flags = ""
            if step.user:
                flags += f"--chown={step.user} "
            if step.mode is not None:
                flags += f"--chmod={step.mode:04o} "
            lines.append(f"COPY {flags}{_paths(step.src, step.dest)}")
        elif isinstance(step, Env):
            lines.append("ENV " + " ".join(f"{k}={_quote_env(v)}" for k, v in step.values))
        elif isinstance(step, Workdir):
            lines.append(f"WORKDIR {step.path}")
        elif isinstance(step, User):
            lines.append(f"USER {step.name}")
            current_user = step.name
    if plan.ready_cmd:
        lines.append(f"HEALTHCHECK CMD {plan.ready_cmd}")
    if plan.start_cmd:
        lines.append(f"ENTRYPOINT {plan.start_cmd}")
    return "\n".join(lines) + "\n"

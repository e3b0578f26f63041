"""Git as data: command lines to run in the sandbox, parsers for their output, credentials and
redaction. No I/O; `sandbox.git` runs these through `sandbox.commands`.

Credentials never appear in a command line or a URL: git asks a one-line credential helper,
which reads them from the environment of that one git process (`CORRAL_GIT_USERNAME`,
`CORRAL_GIT_PASSWORD`). Every error leaving `sandbox.git` is passed through `redact`, so a
secret the remote echoes back is replaced by `***` too.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Iterable, Sequence
from typing import Final

from corral.sdk._errors import (
    CommandExitException,
    GitAuthException,
    GitUpstreamException,
    InvalidArgumentException,
    SandboxException,
)

__all__ = [
    "GitBranches",
    "GitFileStatus",
    "GitStatus",
    "add_args",
    "branches_args",
    "checkout_args",
    "clone_args",
    "commit_args",
    "credential_envs",
    "git_command",
    "git_error",
    "init_args",
    "parse_branches",
    "parse_status",
    "pull_args",
    "push_args",
    "redact",
    "remote_add_args",
    "status_args",
]

TOKEN_USERNAME: Final = "x-access-token"
# Reads the credentials from this git process's environment; prints nothing for other actions.
_HELPER: Final = (
    '!f() { test "$1" = get || exit 0; '
    'printf "username=%s\\npassword=%s\\n" "$CORRAL_GIT_USERNAME" "$CORRAL_GIT_PASSWORD"; }; f'
)
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_AUTH_FAILURES = (
    "authentication failed",
    "terminal prompts disabled",
    "could not read username",
    "could not read password",
    "invalid username or password",
    "access denied",
    "permission denied",
    "not authorized",
    "401 unauthorized",
    "403 forbidden",
)
_NO_UPSTREAM = ("has no upstream branch", "no tracking information", "no upstream configured")


@dataclasses.dataclass(frozen=True)
class GitFileStatus:
    """One changed path of `git status`."""

    name: str
    """Path relative to the repository root."""
    status: str
    """`modified`, `added`, `deleted`, `renamed`, `copied`, `typechange`, `untracked` or `conflict`."""
    index_status: str
    """Staged-side code (`M`, `A`, `D`, `R`, `.` for none, `?` for untracked)."""
    working_tree_status: str
    """Working-tree code (same alphabet)."""
    staged: bool
    """Whether the change is staged."""
    renamed_from: str | None = None
    """The old path of a rename or copy."""


@dataclasses.dataclass(frozen=True)
class GitStatus:
    """`git status` of a repository."""

    current_branch: str | None
    """Checked-out branch (None when HEAD is detached)."""
    upstream: str | None
    """Its upstream, e.g. `origin/main`."""
    ahead: int
    """Commits on the branch that the upstream lacks."""
    behind: int
    """Commits on the upstream that the branch lacks."""
    detached: bool
    """Whether HEAD is detached."""
    file_status: list[GitFileStatus]
    """Changed paths."""

    @property
    def is_clean(self) -> bool:
        """No changed or untracked paths."""
        return not self.file_status

    @property
    def has_staged(self) -> bool:
        """Some change is staged."""
        return any(item.staged for item in self.file_status)

    @property
    def has_untracked(self) -> bool:
        """Some path is untracked."""
        return any(item.status == "untracked" for item in self.file_status)


@dataclasses.dataclass(frozen=True)
class GitBranches:
    """Local branches of a repository."""

    branches: list[str]
    """Branch names, sorted."""
    current_branch: str | None
    """The checked-out one (None when detached or before the first commit)."""


def git_command(args: Sequence[str], repo_path: str | None = None, *, with_credentials: bool = False) -> str:
    """The shell line for `git [-C repo] [credential helper] args...`, every word quoted."""
    words = ["git"]
    if repo_path:
        words += ["-C", repo_path]
    if with_credentials:
        words += ["-c", "credential.helper=", "-c", f"credential.helper={_HELPER}"]
    return " ".join(shlex.quote(word) for word in [*words, *args])


def credential_envs(username: str | None, password: str | None, token: str | None) -> dict[str, str]:
    """Environment for one authenticated git process (empty when no credentials are given).

    A `token` is sent as the password with the username `x-access-token` unless one is given.
    """
    if token is not None and password is not None:
        raise InvalidArgumentException("pass either password= or token=, not both")
    secret = token if token is not None else password
    if secret is None:
        if username:
            raise InvalidArgumentException("username= needs password= or token=")
        return {"GIT_TERMINAL_PROMPT": "0"}
    user = username or (TOKEN_USERNAME if token is not None else None)
    if not user:
        raise InvalidArgumentException("password= needs username= (or pass token= alone)")
    return {"GIT_TERMINAL_PROMPT": "0", "CORRAL_GIT_USERNAME": user, "CORRAL_GIT_PASSWORD": secret}


def clone_args(url: str, path: str | None, branch: str | None, depth: int | None) -> list[str]:
    """`git clone [--branch B] [--depth N] -- URL [PATH]`."""
    if not url:
        raise InvalidArgumentException("a repository URL is required")
    args = ["clone"]
    if branch:
        args += ["--branch", branch, "--single-branch"]
    if depth is not None:
        if depth < 1:
            raise InvalidArgumentException(f"depth must be at least 1, got {depth}")
        args += ["--depth", str(depth)]
    args += ["--", url]
    if path:
        args.append(path)
    return args


def init_args(path: str, bare: bool, initial_branch: str | None) -> list[str]:
    """`git init [--bare] [--initial-branch B] -- PATH` (git creates PATH)."""
    if not path:
        raise InvalidArgumentException("a path for the new repository is required")
    args = ["init"]
    if bare:
        args.append("--bare")
    if initial_branch:
        args += ["--initial-branch", initial_branch]
    return [*args, "--", path]


def remote_add_args(name: str, url: str) -> list[str]:
    """`git remote add NAME URL`."""
    return ["remote", "add", "--", name, url]


def status_args() -> list[str]:
    """Machine-readable status with branch info, NUL-separated."""
    return ["status", "--porcelain=v2", "--branch", "-z"]


def branches_args() -> list[str]:
    """Local branches with a `*` marking the current one."""
    return ["for-each-ref", "--format=%(HEAD)%09%(refname:short)", "refs/heads/"]


def checkout_args(branch: str, create: bool) -> list[str]:
    """`git checkout [-b] BRANCH`."""
    if not branch or branch.startswith("-"):
        raise InvalidArgumentException(f"not a branch name: {branch!r}")
    return ["checkout", *(["-b"] if create else []), branch]


def add_args(files: Sequence[str] | None, all: bool) -> list[str]:
    """`git add -A` or `git add -- FILES`."""
    if files:
        return ["add", "--", *files]
    return ["add", "-A"] if all else ["add", "-u"]


def commit_args(
    message: str, author_name: str | None, author_email: str | None, allow_empty: bool
) -> list[str]:
    """`[-c user.name=..] [-c user.email=..] commit -m MESSAGE [--allow-empty]`."""
    if not message:
        raise InvalidArgumentException("a commit message is required")
    args: list[str] = []
    if author_name:
        args += ["-c", f"user.name={author_name}"]
    if author_email:
        args += ["-c", f"user.email={author_email}"]
    args += ["commit", "-m", message]
    if allow_empty:
        args.append("--allow-empty")
    return args


def push_args(remote: str | None, branch: str | None, set_upstream: bool) -> list[str]:
    """`git push [-u] [REMOTE [BRANCH]]` (a branch alone pushes to `origin`)."""
    args = ["push"]
    if remote or branch:
        if set_upstream:
            args.append("--set-upstream")
        args.append(remote or "origin")
        if branch:
            args.append(branch)
    return args


def pull_args(remote: str | None, branch: str | None) -> list[str]:
    """`git pull [REMOTE [BRANCH]]`."""
    args = ["pull"]
    if remote or branch:
        args.append(remote or "origin")
        if branch:
            args.append(branch)
    return args


def _file_status(code: str, path: str, renamed_from: str | None) -> GitFileStatus:
    index, work = code[0], code[1]
    codes = {index, work}
    for letter, name in (
        ("U", "conflict"),
        ("R", "renamed"),
        ("C", "copied"),
        ("D", "deleted"),
        ("A", "added"),
        ("M", "modified"),
        ("T", "typechange"),
    ):
        if letter in codes:
            status = name
            break
    else:
        status = "unknown"
    return GitFileStatus(
        name=path,
        status=status,
        index_status=index,
        working_tree_status=work,
        staged=index not in ".?",
        renamed_from=renamed_from,
    )


def parse_status(output: str) -> GitStatus:
    """Parse `git status --porcelain=v2 --branch -z`."""
    branch: str | None = None
    upstream: str | None = None
    ahead = behind = 0
    detached = False
    files: list[GitFileStatus] = []
    records = output.split("\0")
    i = 0
    while i < len(records):
        record = records[i]
        i += 1
        if not record:
            continue
        if record.startswith("# branch.head "):
            head = record[len("# branch.head ") :]
            detached = head == "(detached)"
            branch = None if detached else head
        elif record.startswith("# branch.upstream "):
            upstream = record[len("# branch.upstream ") :]
        elif record.startswith("# branch.ab "):
            for part in record[len("# branch.ab ") :].split():
                if part.startswith("+"):
                    ahead = int(part[1:])
                elif part.startswith("-"):
                    behind = int(part[1:])
        elif record.startswith("1 "):
            fields = record.split(" ", 8)
            files.append(_file_status(fields[1], fields[8], None))
        elif record.startswith("2 "):
            fields = record.split(" ", 9)
            original = records[i] if i < len(records) else None
            i += 1
            files.append(_file_status(fields[1], fields[9], original))
        elif record.startswith("u "):
            fields = record.split(" ", 10)
            files.append(_file_status("UU", fields[10], None))
        elif record.startswith("? "):
            files.append(GitFileStatus(record[2:], "untracked", "?", "?", staged=False))
    return GitStatus(
        current_branch=branch,
        upstream=upstream,
        ahead=ahead,
        behind=behind,
        detached=detached,
        file_status=files,
    )


def parse_branches(output: str) -> GitBranches:
    """Parse the `branches_args()` output (`*\\tmain` / ` \\tdev` lines)."""
    branches: list[str] = []
    current: str | None = None
    for line in output.splitlines():
        if "\t" not in line:
            continue
        mark, name = line.split("\t", 1)
        branches.append(name)
        if mark.strip() == "*":
            current = name
    return GitBranches(branches=sorted(branches), current_branch=current)


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """`text` with every secret and every `user:pass@` in a URL replaced by `***`."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return _URL_USERINFO.sub(lambda m: m.group("scheme") + "***@", text)


def git_error(action: str, exc: SandboxException, secrets: Sequence[str | None]) -> SandboxException:
    """The exception to raise for a failed git command: typed, redacted, saying what to do."""
    if isinstance(exc, CommandExitException):
        stdout, stderr = redact(exc.stdout, secrets), redact(exc.stderr, secrets)
        text = f"{stderr}\n{stdout}".lower()
        if any(snippet in text for snippet in _AUTH_FAILURES):
            return GitAuthException(
                f"git {action}: the remote refused the credentials ({stderr.strip()[-500:]}); "
                "pass username= and password= or token= with access to the repository",
                code="unauthenticated",
            )
        if any(snippet in text for snippet in _NO_UPSTREAM):
            return GitUpstreamException(
                f"git {action}: the branch has no upstream; pass remote= and branch= (push sets it with set_upstream=True)",
                code="failed_precondition",
            )
        return CommandExitException(stdout=stdout, stderr=stderr, exit_code=exc.exit_code, error=exc.error)
    return type(exc)(redact(exc.message, secrets), code=exc.code)

"""`sandbox.git`: git in the sandbox, run through `sandbox.commands`.

Credentials (`username`+`password`, or `token`) reach only the one git process that needs them,
through its environment; errors are redacted (see `corral.sdk._git`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from corral.sdk._async.commands import AsyncCommands
from corral.sdk._errors import CommandResult, SandboxException
from corral.sdk._git import (
    GitBranches,
    GitStatus,
    add_args,
    branches_args,
    checkout_args,
    clone_args,
    commit_args,
    credential_envs,
    git_command,
    git_error,
    init_args,
    parse_branches,
    parse_status,
    pull_args,
    push_args,
    remote_add_args,
    status_args,
)

__all__ = ["AsyncGit"]


class AsyncGit:
    """Git operations on repositories inside the sandbox (`sandbox.git`)."""

    def __init__(self, commands: AsyncCommands) -> None:
        self._commands = commands

    async def _run(
        self,
        action: str,
        args: Sequence[str],
        path: str | None,
        *,
        envs: Mapping[str, str] | None = None,
        user: str | None = None,
        timeout: float | None = 60,
        credentials: Mapping[str, str] | None = None,
    ) -> CommandResult:
        secrets = [credentials.get("CORRAL_GIT_PASSWORD")] if credentials else []
        command = git_command(
            args, path, with_credentials=bool(credentials and "CORRAL_GIT_PASSWORD" in credentials)
        )
        try:
            return await self._commands.run(
                command,
                envs={**(envs or {}), **(credentials or {"GIT_TERMINAL_PROMPT": "0"})},
                user=user,
                timeout=timeout,
            )
        except SandboxException as exc:
            raise git_error(action, exc, secrets) from None

    async def clone(
        self,
        url: str,
        path: str | None = None,
        branch: str | None = None,
        depth: int | None = None,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        envs: Mapping[str, str] | None = None,
        user: str | None = None,
        timeout: float | None = 60,
    ) -> CommandResult:
        """Clone `url` into `path` (default: git's choice under the user's home)."""
        credentials = credential_envs(username, password, token)
        return await self._run(
            "clone",
            clone_args(url, path, branch, depth),
            None,
            envs=envs,
            user=user,
            timeout=timeout,
            credentials=credentials,
        )

    async def init(
        self,
        path: str,
        bare: bool = False,
        initial_branch: str | None = None,
        user: str | None = None,
        timeout: float | None = 60,
    ) -> CommandResult:
        """Create a repository at `path` (created if missing)."""
        return await self._run(
            "init", init_args(path, bare, initial_branch), None, user=user, timeout=timeout
        )

    async def remote_add(
        self, path: str, name: str, url: str, user: str | None = None, timeout: float | None = 60
    ) -> CommandResult:
        """Add a remote to the repository at `path`."""
        return await self._run("remote add", remote_add_args(name, url), path, user=user, timeout=timeout)

    async def status(self, path: str, user: str | None = None, timeout: float | None = 60) -> GitStatus:
        """Branch, upstream, ahead/behind and changed files of the repository at `path`."""
        result = await self._run("status", status_args(), path, user=user, timeout=timeout)
        return parse_status(result.stdout)

    async def branches(self, path: str, user: str | None = None, timeout: float | None = 60) -> GitBranches:
        """Local branches of the repository at `path`."""
        result = await self._run("branch", branches_args(), path, user=user, timeout=timeout)
        return parse_branches(result.stdout)

    async def checkout_branch(
        self,
        path: str,
        branch: str,
        create: bool = False,
        user: str | None = None,
        timeout: float | None = 60,
    ) -> CommandResult:
        """Check out `branch` (with `create=True`, a new branch from HEAD)."""
        return await self._run("checkout", checkout_args(branch, create), path, user=user, timeout=timeout)

    async def add(
        self,
        path: str,
        files: Sequence[str] | None = None,
        all: bool = True,
        user: str | None = None,
        timeout: float | None = 60,
    ) -> CommandResult:
        """Stage `files`, or every change (`all=True`, the default)."""
        return await self._run("add", add_args(files, all), path, user=user, timeout=timeout)

    async def commit(
        self,
        path: str,
        message: str,
        author_name: str | None = None,
        author_email: str | None = None,
        allow_empty: bool = False,
        user: str | None = None,
        timeout: float | None = 60,
    ) -> CommandResult:
        """Commit what is staged."""
        args = commit_args(message, author_name, author_email, allow_empty)
        return await self._run("commit", args, path, user=user, timeout=timeout)

    async def push(
        self,
        path: str,
        remote: str | None = None,
        branch: str | None = None,
        set_upstream: bool = True,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        user: str | None = None,
        timeout: float | None = 60,
    ) -> CommandResult:
        """Push to `remote`/`branch`, or to the branch's upstream when neither is given."""
        credentials = credential_envs(username, password, token)
        args = push_args(remote, branch, set_upstream)
        return await self._run("push", args, path, user=user, timeout=timeout, credentials=credentials)

    async def pull(
        self,
        path: str,
        remote: str | None = None,
        branch: str | None = None,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        user: str | None = None,
        timeout: float | None = 60,
    ) -> CommandResult:
        """Pull from `remote`/`branch`, or from the branch's upstream when neither is given."""
        credentials = credential_envs(username, password, token)
        args = pull_args(remote, branch)
        return await self._run("pull", args, path, user=user, timeout=timeout, credentials=credentials)

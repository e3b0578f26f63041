"""Build sandboxes: a node sandbox on a layer stack that runs one build step, whose overlay upper
directory then becomes a new read-only layer.

Lifecycle of a `BuildSandbox`:

    open(stack)  → running sandbox (`Node.create`) with a private upper dir
    run(...)*    → commands as any sandbox user (`bash -l -c`, E2B's way), output streamed
    commit()     → the container is stopped (`Node.stop`: every process is dead, nothing writes any
                   more), the upper dir is copied into a content-addressed layer (`Node.commit_upper`:
                   `cp -a` as root keeps whiteouts, opaque-dir xattrs, owners, modes and hard links)
                   and the sandbox removed; None when the step changed nothing
    | close()    → sandbox removed, its upper dir with it (a failed or metadata-only step)

Files the runtime itself adds (the `/.corral` mount point of the init binary) are taken out of the
upper dir first, so a step that changed nothing yields no layer. The overlay's `work` dir is never
part of a layer.

Build sandboxes are node sandboxes the control plane has no record of: a server restart removes
any that were left running (the node's reconcile treats them as strays).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from corral.core.errors import CorralError, Internal
from corral.core.sandbox import SandboxSpec
from corral.node.envd.users import lookup_user
from corral.node.runtime._fdio import read_chunk
from corral.node.runtime.base import ExitStatus, SpawnRequest, UserIds

__all__ = ["BUILD_SANDBOX_PREFIX", "PATH", "BuildSandbox", "CommandFailed", "OutputSink"]

log = logging.getLogger(__name__)

BUILD_SANDBOX_PREFIX = "bld"
BUILD_DISK_MB = 32 * 1024  # room for one step's changes (the image is sparse: only writes cost)
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Output of a command that exited keeps flowing while background children hold its pipes; we stop
# reading this long after the command itself ended.
_DRAIN_AFTER_EXIT_S = 1.0
# Entries the runtime creates in every container; never part of a layer.
_RUNTIME_ARTIFACTS = (".corral",)

OutputSink = Callable[[str, str], Any]  # (stream name, line)


class CommandFailed(Exception):
    """A step's command could not run or exited non-zero. `message` is E2B's wording."""

    def __init__(self, message: str, status: ExitStatus | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def _remove_entry(parent: Path, name: str) -> None:
    """Remove `parent/name` without following a symlink out of a (hostile) layer."""
    path = parent / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)  # fd-based on Linux: never follows symlinks inside
    else:
        os.unlink(path)


class BuildSandbox:
    def __init__(self, node: Any, handle: Any) -> None:
        self._node = node
        self._handle = handle
        self._closed = False

    @property
    def sandbox_id(self) -> str:
        return str(self._handle.sandbox_id)

    @classmethod
    async def open(
        cls, node: Any, *, layers: Sequence[str], template_id: str, cpu_count: int, memory_mb: int
    ) -> BuildSandbox:
        sandbox_id = BUILD_SANDBOX_PREFIX + secrets.token_hex(8)
        spec = SandboxSpec(
            sandbox_id=sandbox_id,
            template_id=template_id,
            layers=tuple(layers),
            cpu_count=cpu_count,
            memory_mb=memory_mb,
            disk_size_mb=BUILD_DISK_MB,
            allow_internet_access=True,
            access_token=None,
        )
        handle = await node.create(spec)
        return cls(node, handle)

    @property
    def root(self) -> Any:
        """The sandbox's `ConfinedRoot`."""
        return self._handle.envd.root

    def user(self, name: str) -> UserIds:
        """The sandbox user `name`; an unknown one is E2B's `unauthenticated: invalid username`."""
        return lookup_user(self.root, name)

    def is_dir(self, path: str) -> bool:
        try:
            return stat.S_ISDIR(self.root.stat(path).st_mode)
        except CorralError:
            return False

    async def run(
        self,
        command: str,
        *,
        user: UserIds,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        on_output: OutputSink | None = None,
        timeout_s: float | None = None,
        login: bool = True,
    ) -> ExitStatus:
        """Run `bash [-l] -c command` as `user` in `cwd` (default: the user's home, or `/` when an
        image has the user but not its home). Output lines go to `on_output(stream, line)`.
        Returns the exit status (non-zero is not an error here)."""
        if not cwd:
            cwd = user.home if self.is_dir(user.home) else "/"
        if not self.is_dir(cwd):
            raise CommandFailed(f"command failed: invalid_argument: cwd '{cwd}' does not exist")
        full_env = {"PATH": PATH, "HOME": user.home, "USER": user.name, "LOGNAME": user.name}
        for key, value in (env or {}).items():
            full_env[key] = value
        if env and "PATH" in env:
            full_env["PATH"] = f"{env['PATH']}:{PATH}"  # E2B: standard dirs stay findable
        argv = ["/bin/bash", "-l", "-c", command] if login else ["/bin/bash", "-c", command]
        try:
            proc = await self._handle.envd.spawner.spawn(
                SpawnRequest(argv=argv, env=full_env, cwd=cwd, user=user)
            )
        except CorralError as exc:
            raise CommandFailed(f"command failed: {exc.code}: {exc.message}") from None
        readers = [asyncio.create_task(self._pump(name, fd, on_output)) for name, fd in proc.output_fds()]
        try:
            async with asyncio.timeout(timeout_s):
                status: ExitStatus = await proc.wait()
        except TimeoutError:
            proc.send_signal(9)
            await proc.wait()
            raise CommandFailed(
                f"command failed: deadline_exceeded: the command ran longer than {timeout_s:.0f} s"
            ) from None
        finally:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_DRAIN_AFTER_EXIT_S):
                    await asyncio.gather(*readers, return_exceptions=True)
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            proc.close()
        return status

    @staticmethod
    async def _pump(stream: str, fd: int, on_output: OutputSink | None) -> None:
        pending = b""
        while chunk := await read_chunk(fd):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if on_output is not None:
                for line in lines:
                    on_output(stream, line.decode(errors="replace").rstrip("\r"))
            if len(pending) > 65536:  # a line without end: cut it
                if on_output is not None:
                    on_output(stream, pending.decode(errors="replace"))
                pending = b""
        if pending and on_output is not None:
            on_output(stream, pending.decode(errors="replace").rstrip("\r"))

    async def output_of(self, command: str, *, user: UserIds, env: Mapping[str, str] | None = None) -> str:
        """stdout of a command that must succeed (metadata probes such as `pwd`)."""
        out: list[str] = []
        status = await self.run(
            command,
            user=user,
            cwd="/",
            env=env,
            on_output=lambda s, line: out.append(line) if s == "stdout" else None,
        )
        if status.exit_code != 0:
            raise CommandFailed(status.status, status)
        return "\n".join(out)

    def put_file(self, source: Path, dest: str, *, mode: int = 0o600) -> None:
        """Copy a host file (ours) to `dest` in the sandbox, owned by root; parents must exist.
        Blocking: call it in a worker thread."""
        fd, _ = self.root.open_for_write(dest, uid=0, gid=0, mode=mode)
        with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)

    def _upper(self) -> Path:
        path: Path = self._handle.path
        on_disk = path / "disk" / "upper"  # a sandbox with its own disk image keeps upper/ there
        return on_disk if on_disk.is_dir() else path / "upper"

    async def commit(self) -> str | None:
        """The upper dir as a new layer (its digest), or None when the step left no change.
        The sandbox is removed either way."""
        if self._closed:
            raise Internal("build sandbox already closed")
        try:
            await self._node.stop(self.sandbox_id)  # every process in the sandbox is gone
            upper = self._upper()
            for name in _RUNTIME_ARTIFACTS:
                await asyncio.to_thread(_remove_entry, upper, name)
            if not os.listdir(upper):
                return None
            digest: str = await self._node.commit_upper(self.sandbox_id)
            return digest
        finally:
            await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._node.destroy(self.sandbox_id)
        except Exception:  # a leftover is removed by the node's reconcile; the build result stands
            log.exception("failed to remove build sandbox %s", self.sandbox_id)

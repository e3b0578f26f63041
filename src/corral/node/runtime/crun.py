"""Executor for an OCI runtime with crun's command line (crun, runc, runsc share it).

`OciRuntime` drives container lifecycles; `RuntimeSpawner` starts processes in one container with
`<runtime> exec`. Processes are started with posix_spawn so that we can map a pipe onto fd 3 of
the runtime: a two-line sh wrapper inside the sandbox writes its pid there before it execs the
command, which gives the sandbox-side pid without a race against a short-lived process.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import socket
import struct
import termios
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from corral.core.errors import Internal, InvalidArgument, NotFound
from corral.node.runtime._fdio import read_chunk, wait_readable
from corral.node.runtime.base import ExitStatus, PtySize, SpawnRequest
from corral.node.runtime.oci import build_exec_process

__all__ = ["OciRuntime", "RuntimeSpawner", "RuntimeProcess"]

# Writes its own pid to fd 3, closes it, and becomes the command (exec keeps the pid).
_PID_WRAPPER = ("/bin/sh", "-c", 'echo $$ >&3; exec 3>&-; exec "$@"', "sh")


class OciRuntime:
    """Container lifecycle through the runtime CLI; state kept under its own `--root`."""

    def __init__(self, binary: str, state_root: Path) -> None:
        self.binary = binary
        self.state_root = state_root

    def _argv(self, *args: str) -> list[str]:
        return [self.binary, "--root", str(self.state_root), *args]

    async def _run(self, *args: str, check: bool = True) -> tuple[int, bytes, bytes]:
        proc = await asyncio.create_subprocess_exec(
            *self._argv(*args),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if check and proc.returncode != 0:
            raise Internal(f"{self.binary} {args[0]} failed: {err.decode(errors='replace').strip()}")
        return proc.returncode or 0, out, err

    async def run(self, container_id: str, bundle: Path) -> int:
        """Create and start a detached container; returns the host pid of its init."""
        pid_file = bundle / "init.pid"
        log_file = bundle / "runtime.log"
        # The container's init inherits the runtime's stdio: never give it our pipes (they would
        # stay open for the sandbox's whole life).
        with open(log_file, "wb") as log:
            proc = await asyncio.create_subprocess_exec(
                *self._argv("run", "--detach", "--bundle", str(bundle), "--pid-file", str(pid_file), container_id),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
            await proc.wait()
        if proc.returncode != 0:
            detail = log_file.read_text(errors="replace").strip()
            raise Internal(f"{self.binary} run failed for sandbox {container_id}: {detail}")
        return int(pid_file.read_text())

    async def kill(self, container_id: str, signum: int = signal.SIGKILL) -> None:
        await self._run("kill", "--all", container_id, str(signum), check=False)

    async def delete(self, container_id: str) -> None:
        await self._run("delete", "--force", container_id, check=False)

    async def pause(self, container_id: str) -> None:
        await self._run("pause", container_id)

    async def resume(self, container_id: str) -> None:
        await self._run("resume", container_id)

    async def state(self, container_id: str) -> dict[str, Any] | None:
        rc, out, _ = await self._run("state", container_id, check=False)
        return json.loads(out) if rc == 0 else None

    async def list(self) -> list[dict[str, Any]]:
        if not self.state_root.exists():
            return []
        _, out, _ = await self._run("list", "--format", "json", check=False)
        return json.loads(out or b"[]") or []


class RuntimeProcess:
    """One process started with `<runtime> exec`; the runtime process is our child and waits for it."""

    def __init__(
        self,
        runtime_pid: int,
        pid: int,
        stdin_fd: int | None,
        stdout_fd: int | None,
        stderr_fd: int | None,
        pty_fd: int | None,
    ) -> None:
        self.runtime_pid = runtime_pid
        self.pid = pid
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd
        self.stderr_fd = stderr_fd
        self.pty_fd = pty_fd
        self._host_pid = _host_pid_of(runtime_pid)
        self._signals_sent: set[int] = set()
        self._status: ExitStatus | None = None
        self._pidfd = os.pidfd_open(runtime_pid)

    def output_fds(self) -> Sequence[tuple[str, int]]:
        if self.pty_fd is not None:
            return [("pty", self.pty_fd)]
        return [(name, fd) for name, fd in (("stdout", self.stdout_fd), ("stderr", self.stderr_fd)) if fd is not None]

    def write_stdin(self, data: bytes) -> None:
        fd = self.pty_fd if self.pty_fd is not None else self.stdin_fd
        if fd is None:
            raise InvalidArgument("stdin is not enabled for this process")
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                raise InvalidArgument("process is not reading its input fast enough") from None

    def close_stdin(self) -> None:
        if self.stdin_fd is not None:
            os.close(self.stdin_fd)
            self.stdin_fd = None

    def resize(self, size: PtySize) -> None:
        if self.pty_fd is None:
            raise InvalidArgument("process has no pseudo-terminal")
        fcntl.ioctl(self.pty_fd, termios.TIOCSWINSZ, struct.pack("HHHH", size.rows, size.cols, 0, 0))

    def send_signal(self, signum: int) -> None:
        if self._status is not None:
            return
        host_pid = self._host_pid or _host_pid_of(self.runtime_pid)
        if host_pid is None:
            return
        self._signals_sent.add(signum)
        try:
            os.kill(host_pid, signum)
        except ProcessLookupError:
            pass

    async def wait(self) -> ExitStatus:
        while self._status is None:
            await wait_readable(self._pidfd)
            try:
                info = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG)
            except ChildProcessError:
                info = None
            if info is None:
                continue
            self._status = self._exit_status(info.si_code, info.si_status)
            os.close(self._pidfd)
            self.close_stdin()
        return self._status

    def _exit_status(self, si_code: int, si_status: int) -> ExitStatus:
        if si_code == os.CLD_EXITED:
            # The runtime reports a command killed by signal N as 128+N; we can only tell that apart
            # from `exit 128+N` when the signal came from us.
            if si_status > 128 and (si_status - 128) in self._signals_sent:
                return ExitStatus(exit_code=-1, signal=si_status - 128)
            return ExitStatus(exit_code=si_status)
        return ExitStatus(exit_code=-1, signal=si_status)

    def close(self) -> None:
        for name in ("stdin_fd", "stdout_fd", "stderr_fd", "pty_fd"):
            fd = getattr(self, name)
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
                setattr(self, name, None)


def _host_pid_of(runtime_pid: int) -> int | None:
    """The host pid of the command: the only child of `<runtime> exec` (it forks once into the sandbox)."""
    try:
        children = Path(f"/proc/{runtime_pid}/task/{runtime_pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[-1]) if children else None


class RuntimeSpawner:
    """Starts processes in one running container (implements `corral.node.runtime.base.Spawner`)."""

    def __init__(self, runtime: OciRuntime, container_id: str, bundle: Path, nofile_hard: int) -> None:
        self.runtime = runtime
        self.container_id = container_id
        self.bundle = bundle
        self.nofile_hard = nofile_hard

    async def spawn(self, request: SpawnRequest) -> RuntimeProcess:
        process = build_exec_process(
            argv=[*_PID_WRAPPER, *request.argv],
            env=request.env,
            cwd=request.cwd,
            user=request.user,
            pty=request.pty,
            nofile_hard=self.nofile_hard,
        )
        token = uuid.uuid4().hex
        process_file = self.bundle / f"exec-{token}.json"
        process_file.write_text(json.dumps(process))
        argv = self.runtime._argv("exec", "--preserve-fds", "1", "--process", str(process_file))
        console: socket.socket | None = None
        try:
            if request.pty is not None:
                console_path = self.bundle / f"console-{token}.sock"
                console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
                console.bind(str(console_path))
                console.listen(1)
                argv += ["--console-socket", str(console_path)]
            argv.append(self.container_id)
            return await self._start(argv, request, console)
        finally:
            process_file.unlink(missing_ok=True)
            if console is not None:
                console.close()
                (self.bundle / f"console-{token}.sock").unlink(missing_ok=True)

    async def _start(self, argv: list[str], request: SpawnRequest, console: socket.socket | None) -> RuntimeProcess:
        pid_r, pid_w = os.pipe2(os.O_CLOEXEC)
        parent_fds: list[int] = [pid_r]
        child_fds: list[int] = [pid_w]
        actions: list[tuple[Any, ...]] = []
        stdin_fd = stdout_fd = stderr_fd = None
        try:
            if request.stdin and console is None:
                r, stdin_fd = os.pipe2(os.O_CLOEXEC)
                child_fds.append(r)
                parent_fds.append(stdin_fd)
                actions.append((os.POSIX_SPAWN_DUP2, r, 0))
            else:
                actions.append((os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0))
            if console is None:
                stdout_fd, w_out = os.pipe2(os.O_CLOEXEC)
                stderr_fd, w_err = os.pipe2(os.O_CLOEXEC)
                child_fds += [w_out, w_err]
                parent_fds += [stdout_fd, stderr_fd]
                actions += [(os.POSIX_SPAWN_DUP2, w_out, 1), (os.POSIX_SPAWN_DUP2, w_err, 2)]
            else:
                actions += [
                    (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 2, "/dev/null", os.O_WRONLY, 0),
                ]
            actions.append((os.POSIX_SPAWN_DUP2, pid_w, 3))
            runtime_pid = os.posix_spawn(argv[0] if "/" in argv[0] else _which(argv[0]), argv, os.environ, file_actions=actions)
        except BaseException:
            for fd in parent_fds + child_fds:
                os.close(fd)
            raise
        for fd in child_fds:
            os.close(fd)
        for fd in parent_fds:
            os.set_blocking(fd, False)
        pty_fd = None
        try:
            if console is not None:
                pty_fd = await asyncio.wait_for(_receive_console(console), timeout=10)
                os.set_blocking(pty_fd, False)
            line = b""
            while not line.endswith(b"\n"):
                chunk = await asyncio.wait_for(read_chunk(pid_r, 32), timeout=10)
                if not chunk:
                    break
                line += chunk
        except BaseException:
            os.kill(runtime_pid, signal.SIGKILL)
            os.waitpid(runtime_pid, 0)
            for fd in parent_fds[1:] + ([pty_fd] if pty_fd is not None else []):
                os.close(fd)
            raise
        finally:
            os.close(pid_r)
        proc = RuntimeProcess(runtime_pid, int(line) if line.strip() else 0, stdin_fd, stdout_fd, stderr_fd, pty_fd)
        if not line.strip():
            # The runtime failed before the command started (bad cwd, missing sh, dead sandbox).
            status = await proc.wait()
            detail = b""
            if stderr_fd is not None:
                detail = await read_chunk(stderr_fd, 4096)
            proc.close()
            raise Internal(f"could not start process (runtime exit {status.exit_code}): {detail.decode(errors='replace').strip()}")
        return proc


async def _receive_console(console: socket.socket) -> int:
    loop = asyncio.get_running_loop()
    conn, _ = await loop.sock_accept(console)
    with conn:
        while True:
            try:
                _, fds, _, _ = socket.recv_fds(conn, 64, 1)
            except BlockingIOError:
                await wait_readable(conn.fileno())
                continue
            if not fds:
                raise NotFound("runtime sent no terminal")
            return fds[0]


_WHICH: dict[str, str] = {}


def _which(name: str) -> str:
    if name not in _WHICH:
        import shutil

        path = shutil.which(name)
        if path is None:
            raise Internal(f"OCI runtime '{name}' not found on PATH")
        _WHICH[name] = path
    return _WHICH[name]

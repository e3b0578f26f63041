"""Executor for an OCI runtime with crun's command line (crun, runc, runsc share it).

`OciRuntime` drives container lifecycles; `RuntimeSpawner` starts processes in one container with
`<runtime> exec`. Processes are started with posix_spawn so that we can map a pipe onto fd 3 of
the runtime: a two-line sh wrapper inside the sandbox writes its pid there before it execs the
command, which gives the sandbox-side pid without a race against a short-lived process.

A process with a terminal gets it from the runtime: `--console-socket` names a unix socket on which
the runtime sends us the pty master (the command gets the slave as its controlling terminal in a
new session). Output is read from the master until EIO, which is what it returns once every
holder of the slave has closed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import termios
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corral.core.errors import Internal
from corral.node import spawn
from corral.node.runtime._fdio import is_readable_now, read_chunk, wait_readable
from corral.node.runtime.base import ExitStatus, PtySize, SpawnRequest
from corral.node.runtime.oci import build_exec_process
from corral.node.runtime.process_io import ProcessIo
from corral.node.runtime.runtimes import traits_for

__all__ = ["OciRuntime", "RuntimeProcess", "RuntimeSpawner"]

# Writes its own pid to fd 3, closes it, and becomes the command (exec keeps the pid).
_PID_WRAPPER = ("/bin/sh", "-c", 'echo $$ >&3; exec 3>&-; exec "$@"', "sh")


class OciRuntime:
    """Container lifecycle through the runtime CLI; state kept under its own `--root`."""

    def __init__(self, binary: str, state_root: Path) -> None:
        self.binary = binary
        self.state_root = state_root
        self.traits = traits_for(binary)  # runsc differs (see corral.node.runtime.runtimes)

    def _argv(self, *args: str) -> list[str]:
        return [self.binary, "--root", str(self.state_root), *self.traits.global_args, *args]

    async def _run(self, *args: str, check: bool = True) -> tuple[int, bytes, bytes]:
        # posix_spawn (corral.node.spawn): asyncio's fork of the server would block its loop.
        done = await spawn.run(self._argv(*args))
        if check and done.returncode != 0:
            raise Internal(f"{self.binary} {args[0]} failed: {done.stderr.decode(errors='replace').strip()}")
        return done.returncode, done.stdout, done.stderr

    async def run(self, container_id: str, bundle: Path, pass_fd: int | None = None) -> int:
        """Create and start a detached container; returns the host pid of its init. `pass_fd`
        reaches the init as its fd 3 (`--preserve-fds 1`: the exec agent's listening socket)."""
        pid_file = bundle / "init.pid"
        log_file = bundle / "runtime.log"
        # The container's init inherits the runtime's stdio: never give it our pipes (they would
        # stay open for the sandbox's whole life), so its output goes to a log file.
        preserve = ("--preserve-fds", "1") if pass_fd is not None else ()
        argv = self._argv("run", "--detach", *preserve, "--bundle", str(bundle), "--pid-file", str(pid_file), container_id)
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(log_file), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ]
        if pass_fd is not None:
            actions.append((os.POSIX_SPAWN_DUP2, pass_fd, 3))
        pid = os.posix_spawn(_which(argv[0]), argv, os.environ, file_actions=actions)  # noqa: ASYNC221 - vfork
        pidfd = os.pidfd_open(pid)
        try:
            await wait_readable(pidfd)
            returncode = os.waitid(os.P_PIDFD, pidfd, os.WEXITED).si_status  # noqa: ASYNC222 - it has exited
        except BaseException:
            _kill_and_reap(pid, pidfd)
            raise
        else:
            os.close(pidfd)
        if returncode != 0:
            detail = log_file.read_text(errors="replace").strip()
            raise Internal(f"{self.binary} run failed for sandbox {container_id}: {detail}")
        return int(pid_file.read_text())

    async def kill(self, container_id: str, signum: int = signal.SIGKILL) -> None:
        await self._run("kill", "--all", container_id, str(signum), check=False)

    async def delete(self, container_id: str) -> None:
        if self.traits.pauses_itself:  # runsc panics deleting a paused container (see runtimes.py)
            await self._run("resume", container_id, check=False)
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


class RuntimeProcess(ProcessIo):
    """One process started with `<runtime> exec` (implements `corral.node.runtime.base.SpawnedProcess`).

    The runtime process is our child; it waits for the command and exits with the command's status
    (128+N when the command died of signal N). The command itself is the runtime's only child; we
    hold a pidfd on it so that a signal can never reach a recycled pid.
    """

    def __init__(
        self,
        runtime_pid: int,
        runtime_pidfd: int,
        pid: int,
        *,
        stdin_fd: int | None = None,
        stdout_fd: int | None = None,
        stderr_fd: int | None = None,
        pty_fd: int | None = None,
        diag_fd: int | None = None,
        signal_command: Callable[[int, int], None] | None = None,
    ) -> None:
        super().__init__(stdin_fd=stdin_fd, stdout_fd=stdout_fd, stderr_fd=stderr_fd, pty_fd=pty_fd)
        self.runtime_pid = runtime_pid
        # Set when the command is not a host process (runsc): signals it by sandbox pid and signal.
        self._signal_command = signal_command
        self.pid = pid
        self._diag_fd = diag_fd  # the runtime's own stderr when the command has a terminal
        self._runtime_pidfd: int | None = runtime_pidfd
        self._command_pid, self._command_pidfd = _open_command(runtime_pid)
        self._signals_sent: set[int] = set()
        self._status: ExitStatus | None = None

    def send_signal(self, signum: int) -> None:
        """Signal the command and its process group (a pipeline, its children), while it runs.

        The group is the one the runtime made for the command (crun exec starts a new session), or
        the one an interactive shell moved itself to. It is only signalled while the command is
        alive, so the group id cannot have been recycled, and never when it is the group of the
        runtime or of this server.
        """
        if self._signal_command is not None:
            runtime_pidfd = self._runtime_pidfd
            if self._status is None and runtime_pidfd is not None and not is_readable_now(runtime_pidfd):
                self._signals_sent.add(signum)
                self._signal_command(self.pid, signum)
            return
        pidfd = self._command_pidfd
        if self._status is not None or pidfd is None or is_readable_now(pidfd):
            return
        self._signals_sent.add(signum)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            pgid = os.getpgid(self._command_pid)
            if pgid > 1 and pgid not in (os.getpgrp(), _pgid_or_none(self.runtime_pid)):
                os.killpg(pgid, signum)
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signum)

    async def wait(self) -> ExitStatus:
        while self._status is None:
            pidfd = self._runtime_pidfd
            assert pidfd is not None, "wait() after close()"
            await wait_readable(pidfd)
            status = self._reap()
            if status is not None:
                return status
        return self._status

    def _reap(self) -> ExitStatus | None:
        if self._status is not None or self._runtime_pidfd is None:
            return self._status
        try:
            info = os.waitid(os.P_PIDFD, self._runtime_pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            info = None
            self._status = ExitStatus(exit_code=-1, signal=signal.SIGKILL)  # reaped elsewhere: unknown
        if info is not None:
            self._status = self._exit_status(info.si_code, info.si_status)
        if self._status is not None:
            os.close(self._runtime_pidfd)
            self._runtime_pidfd = None
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
        """Release every fd; reap the runtime if it has exited (it is our child)."""
        self._reap()
        for name in ("stdin_fd", "stdout_fd", "stderr_fd", "pty_fd", "_diag_fd", "_command_pidfd"):
            fd = getattr(self, name)
            if fd is not None:
                setattr(self, name, None)
                with contextlib.suppress(OSError):
                    self._release(fd)
        if self._runtime_pidfd is not None:
            os.close(self._runtime_pidfd)
            self._runtime_pidfd = None


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def _open_command(runtime_pid: int) -> tuple[int, int | None]:
    """(host pid, pidfd) of the command: the only child of `<runtime> exec`. No pidfd once it has exited.

    The pid is checked to still be the runtime's child after the pidfd is opened, so the pidfd
    cannot name a process that got a recycled pid.
    """
    for pid in reversed(_children(runtime_pid)):
        try:
            pidfd = os.pidfd_open(pid)
        except (ProcessLookupError, OSError):
            continue
        if pid in _children(runtime_pid):
            return pid, pidfd
        os.close(pidfd)
    return 0, None


def _pgid_or_none(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


class _SpawnFds:
    """The fds of one spawn: ours (kept, non-blocking) and the runtime's (closed once it runs)."""

    def __init__(self) -> None:
        self.ours: dict[str, int] = {}
        self.theirs: list[int] = []
        self.actions: list[tuple[Any, ...]] = []

    def pipe_to_child(self, name: str, child_fd: int) -> None:
        """A pipe the runtime reads from (its fd `child_fd`); we keep the write end as `name`."""
        r, w = os.pipe2(os.O_CLOEXEC)
        self.ours[name], self.theirs = w, [*self.theirs, r]
        self.actions.append((os.POSIX_SPAWN_DUP2, r, child_fd))

    def pipe_from_child(self, name: str, child_fd: int) -> None:
        """A pipe the runtime writes to (its fd `child_fd`); we keep the read end as `name`."""
        r, w = os.pipe2(os.O_CLOEXEC)
        self.ours[name], self.theirs = r, [*self.theirs, w]
        self.actions.append((os.POSIX_SPAWN_DUP2, w, child_fd))

    def null(self, child_fd: int) -> None:
        flags = os.O_RDONLY if child_fd == 0 else os.O_WRONLY
        self.actions.append((os.POSIX_SPAWN_OPEN, child_fd, "/dev/null", flags, 0))

    def spawned(self) -> None:
        for fd in self.theirs:
            os.close(fd)
        self.theirs = []
        for fd in self.ours.values():
            os.set_blocking(fd, False)

    def close(self) -> None:
        for fd in [*self.theirs, *self.ours.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.theirs, self.ours = [], {}


class RuntimeSpawner:
    """Starts processes in one running container (implements `corral.node.runtime.base.Spawner`)."""

    def __init__(self, runtime: OciRuntime, container_id: str, bundle: Path, nofile_hard: int) -> None:
        self.runtime = runtime
        self.container_id = container_id
        self.bundle = bundle
        self.nofile_hard = nofile_hard

    async def spawn(self, request: SpawnRequest) -> RuntimeProcess:
        with_pid_pipe = self.runtime.traits.preserve_fds  # else the runtime writes an internal pid file
        process = build_exec_process(
            argv=[*(_PID_WRAPPER if with_pid_pipe else ()), *request.argv],
            env=request.env,
            cwd=request.cwd,
            user=request.user,
            pty=request.pty,
            nofile_hard=self.nofile_hard,
        )
        token = uuid.uuid4().hex[:16]
        process_file = self.bundle / f"exec-{token}.json"
        pid_file = self.bundle / f"pid-{token}"
        spec_fd: int | None = None
        if with_pid_pipe:
            # The process spec goes in a memfd the runtime reads as /proc/self/fd/4: no file to
            # create and unlink on the sandbox dir's filesystem (~1 ms per exec there). fd 4 is
            # not passed on to the command: `--preserve-fds 1` keeps only fd 3.
            spec_fd = _memfd_with(json.dumps(process).encode())
            argv = self.runtime._argv("exec", "--preserve-fds", "1", "--process", f"/proc/self/fd/{_SPEC_FD}")
        else:
            process_file.write_text(json.dumps(process))
            argv = self.runtime._argv("exec", "--internal-pid-file", str(pid_file), "--process", str(process_file))
        console: socket.socket | None = None
        console_path = self.bundle / f"tty-{token}.sock"  # short: AF_UNIX paths end at 107 bytes
        host_pty: tuple[int, int] | None = None
        try:
            if request.pty is not None and not self.runtime.traits.console_socket:
                host_pty = _open_host_pty(request.pty)  # runsc: its stdio becomes the terminal
            elif request.pty is not None:
                console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
                console.bind(str(console_path))
                console.listen(1)
                argv += ["--console-socket", str(console_path)]
            argv.append(self.container_id)
            return await self._start(argv, request, console, None if with_pid_pipe else pid_file, spec_fd, host_pty)
        finally:
            if host_pty is not None:
                os.close(host_pty[1])  # the runtime holds the slave now; we keep the master
            if spec_fd is not None:
                os.close(spec_fd)
            else:
                process_file.unlink(missing_ok=True)
                pid_file.unlink(missing_ok=True)
            if console is not None:
                console.close()
                console_path.unlink(missing_ok=True)

    async def _start(
        self,
        argv: list[str],
        request: SpawnRequest,
        console: socket.socket | None,
        pid_file: Path | None,
        spec_fd: int | None = None,
        host_pty: tuple[int, int] | None = None,
    ) -> RuntimeProcess:
        fds = _SpawnFds()
        if spec_fd is not None:
            fds.actions.append((os.POSIX_SPAWN_DUP2, spec_fd, _SPEC_FD))
        try:
            if pid_file is None:
                fds.pipe_from_child("pid", 3)
            if host_pty is not None:
                for child_fd in (0, 1, 2):
                    fds.actions.append((os.POSIX_SPAWN_DUP2, host_pty[1], child_fd))
            elif console is None:
                if request.stdin:
                    fds.pipe_to_child("stdin", 0)
                else:
                    fds.null(0)
                fds.pipe_from_child("stdout", 1)
                fds.pipe_from_child("stderr", 2)
            else:
                # The command gets the terminal for 0-2; the runtime keeps its stderr for its errors.
                fds.null(0)
                fds.null(1)
                fds.pipe_from_child("diag", 2)
            # Blocking on purpose: posix_spawn (vfork) returns as soon as the child has exec'd, in
            # well under a millisecond; a thread hop would cost more than it saves.
            runtime_pid = os.posix_spawn(_which(argv[0]), argv, os.environ, file_actions=fds.actions)  # noqa: ASYNC221
        except BaseException:
            fds.close()
            if host_pty is not None:
                os.close(host_pty[0])
            raise
        fds.spawned()
        runtime_pidfd = os.pidfd_open(runtime_pid)
        pid_r = fds.ours.pop("pid", None)
        pty_fd: int | None = host_pty[0] if host_pty is not None else None
        try:
            async with asyncio.timeout(_START_TIMEOUT_S):
                if console is not None:
                    pty_fd = await _receive_console(console, runtime_pidfd)
                if pid_r is not None:
                    line = await _read_line(pid_r)
                else:
                    assert pid_file is not None
                    line = await _read_pid_file(pid_file, runtime_pidfd)
        except BaseException:
            _kill_and_reap(runtime_pid, runtime_pidfd)
            fds.close()
            if pty_fd is not None:
                os.close(pty_fd)
            raise
        finally:
            if pid_r is not None:
                os.close(pid_r)
        pid = int(line) if line.strip().isdigit() else 0  # written by the sandbox's /bin/sh: untrusted
        proc = RuntimeProcess(
            runtime_pid,
            runtime_pidfd,
            pid if 0 < pid < 2**31 else 0,
            stdin_fd=fds.ours.get("stdin"),
            stdout_fd=fds.ours.get("stdout"),
            stderr_fd=fds.ours.get("stderr"),
            pty_fd=pty_fd,
            diag_fd=fds.ours.get("diag"),
            signal_command=None if self.runtime.traits.pid_from_host_child else self._signal_by_sandbox_pid,
        )
        if proc.pid == 0 or (console is not None and pty_fd is None):
            # The runtime failed before the command started (bad cwd or user, missing sh, dead sandbox).
            proc.send_signal(signal.SIGKILL)
            status = await proc.wait()
            diag_fd = fds.ours.get("stderr", fds.ours.get("diag"))
            detail = b""
            if diag_fd is not None:
                with contextlib.suppress(BlockingIOError):
                    detail = os.read(diag_fd, 4096)
            proc.close()
            message = detail.decode(errors="replace").strip() or f"runtime exit {status.exit_code}"
            raise Internal(f"could not start process: {message}")
        return proc


    def _signal_by_sandbox_pid(self, pid: int, signum: int) -> None:
        """For runtimes whose processes are not host processes (runsc): `<runtime> kill --pid`
        signals the command; then its process group gets the signal too, as on crun (a timed-out
        `bash -c` must not leave its children running). `<runtime> kill` reaches single processes
        only, so the group is signalled by `kill` run inside the sandbox as root (`<runtime> exec`
        makes each command lead its own group). That runs the sandbox's own /bin/sh, which may be
        anything: it runs in a thread, bounded, never on the event loop. `pid`, `signum`: ints."""
        direct = self.runtime._argv("kill", "--pid", str(int(pid)), self.container_id, str(int(signum)))
        _run_quietly(direct)
        # dash's kill takes no `--`: `kill -9 -N` is the group N
        group_kill = f"kill -{int(signum)} -{int(pid)}"
        inside = self.runtime._argv("exec", "--user", "0:0", self.container_id, "/bin/sh", "-c", group_kill)
        threading.Thread(target=_run_quietly, args=(inside,), name="signal-group", daemon=True).start()


_START_TIMEOUT_S = 30.0


def _run_quietly(argv: list[str]) -> None:
    """Run a runtime command, waiting at most 10 s, its output discarded (it may come from the
    sandbox: never buffered); its outcome does not matter to the caller."""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10, check=False
        )
_SPEC_FD = 4  # where the runtime finds the exec process spec (after the pid pipe on fd 3)


def _memfd_with(data: bytes) -> int:
    fd = os.memfd_create("corral-exec-spec", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


async def _read_pid_file(path: Path, runtime_pidfd: int) -> bytes:
    """The sandbox-side pid the runtime writes to `--internal-pid-file`; b"" when it exits without one."""
    delay = 0.001
    while True:
        with contextlib.suppress(FileNotFoundError):
            text = path.read_bytes().strip()
            if text.isdigit():
                return text + b"\n"
        if is_readable_now(runtime_pidfd):  # exited: one last look, the file may have come just before
            with contextlib.suppress(FileNotFoundError):
                text = path.read_bytes().strip()
                return text + b"\n" if text.isdigit() else b""
            return b""
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.02)


async def _read_line(fd: int) -> bytes:
    """The pid line the wrapper writes to fd 3; b"" when the runtime exits without one (or it is junk)."""
    line = b""
    while not line.endswith(b"\n"):
        chunk = await read_chunk(fd, 32)
        if not chunk or len(line) > 32:
            return b""
        line += chunk
    return line


def _open_host_pty(size: PtySize) -> tuple[int, int]:
    """(master, slave) of a new host pty of `size`; the master is non-blocking, both close-on-exec."""
    master, slave = os.openpty()
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", size.rows, size.cols, 0, 0))
    os.set_blocking(master, False)
    return master, slave


async def _receive_console(console: socket.socket, runtime_pidfd: int) -> int | None:
    """The pty master the runtime sends to the console socket; None if the runtime exits first."""
    loop = asyncio.get_running_loop()
    accepting = asyncio.ensure_future(loop.sock_accept(console))
    exiting = asyncio.ensure_future(wait_readable(runtime_pidfd))
    try:
        await asyncio.wait({accepting, exiting}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (accepting, exiting):
            task.cancel()
        await asyncio.gather(accepting, exiting, return_exceptions=True)
    if accepting.cancelled() or accepting.exception() is not None:
        return None
    conn, _ = accepting.result()
    with conn:
        while True:
            try:
                _, fds, _, _ = socket.recv_fds(conn, 64, 1, socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                await wait_readable(conn.fileno())
                continue
            if not fds:
                return None
            os.set_blocking(fds[0], False)
            return fds[0]


def _kill_and_reap(pid: int, pidfd: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
    os.close(pidfd)


_WHICH: dict[str, str] = {}


def _which(name: str) -> str:
    if "/" in name:
        return name
    if name not in _WHICH:
        path = shutil.which(name)
        if path is None:
            raise Internal(f"OCI runtime '{name}' not found on PATH")
        _WHICH[name] = path
    return _WHICH[name]

"""The host side of the exec agent: start processes through the sandbox's own PID 1.

Why: `crun exec` costs 9-14 ms per command here (benchmarks/README.md, "Exec"). With runtimes
that can pass fds to the container (crun: `RuntimeTraits.exec_agent`), a sandbox's init is
`native/corral-init.c`, which forks commands on request; the command inherits the init's
namespaces, cgroup, seccomp filter and rlimits, and gets the credentials `crun exec` would give.

The channel: before `crun run` the node binds a listening AF_UNIX SOCK_SEQPACKET socket at
`<sandbox dir>/agent.sock` (a host path, not in the sandbox's mount namespace; mode 0600) and
hands it to the init as fd 3 (`listen_agent_socket`). Each `AgentSpawner` connects to it once,
lazily, and again after a server restart or a lost connection. The wire format is described in
native/corral-init.c; `encode_spawn`, `encode_signal` and `parse_message` are its pure halves here.

Processes outlive the server (protocol 2): each SPAWN also hands the agent a copy of our ends of
the process's pipes (it keeps the pty master it made) and envd's description of the process. A
process then never writes into a pipe nobody holds: while no server runs it blocks on a full pipe
(1 MiB: `_PIPE_SIZE`) and goes on once a server reads again. Every new connection first asks for
the processes whose connection is gone (ADOPT): the agent hands over their description, ends and,
for those that exited meanwhile, their exit status, and reports their exits to the new connection
from then on (`AgentConnection.adopted`, given to `AgentSpawner`'s `on_adopted`). An agent of
protocol 1 (a sandbox booted before) is still served, without keeping anything.

Trust: the agent runs inside the sandbox, so a sandbox that took over its PID 1 speaks for it.
Everything it sends is checked (fixed sizes, known request ids and pids, a plausible pid and wait
status, exactly the fds expected: a pty master must be one, checked with fstat and TIOCGPTN);
anything else closes the connection (`AgentProtocolError`), which ends the waits of its
processes as if the sandbox had died. Handed-over processes bring exactly their ends: pipes of the
right direction (fstat, the access mode) or a pty master. The agent never gets a host fd but both
ends of its own commands' pipes (and the host's /dev/null as a stdin without input): copies made
for the send, so a spawn abandoned while its SPAWN waits in the outbox cannot send a recycled fd.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import signal
import socket
import stat
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from corral.core.errors import Internal, InvalidArgument
from corral.node.runtime.base import MAX_DESCRIPTION, ExitStatus, SpawnRequest
from corral.node.runtime.process_io import ProcessIo

__all__ = [
    "AGENT_SOCKET",
    "MAX_DESCRIPTION",
    "PROTOCOL_VERSION",
    "AdoptEnd",
    "AgentConnection",
    "AgentProcess",
    "AgentProtocolError",
    "AgentSpawner",
    "Exited",
    "Failed",
    "Hello",
    "Kept",
    "Spawned",
    "encode_adopt",
    "encode_close_stdin",
    "encode_signal",
    "encode_spawn",
    "exit_status",
    "listen_agent_socket",
    "parse_message",
]

log = logging.getLogger(__name__)

AGENT_SOCKET = "agent.sock"  # in the sandbox's directory on the host
PROTOCOL_VERSION = 2  # corral-init.c PROTOCOL_VERSION
_VERSIONS = (1, 2)  # 1: a sandbox booted with the agent before processes were kept

# Message types and flags (corral-init.c).
_SPAWN, _SIGNAL, _ADOPT, _CLOSE_STDIN = 1, 2, 3, 4
_HELLO, _SPAWNED, _FAILED, _EXIT, _PROCESS, _ADOPTED = 16, 17, 18, 19, 20, 21
_F_PTY, _F_KEEP, _F_STDIN = 1, 2, 4  # SPAWN
_P_PTY, _P_EXITED, _P_STDIN = 1, 2, 4  # PROCESS
_HEADER = struct.Struct("=II")  # type, id
_SPAWN_FIXED_V1 = struct.Struct("=IIIIIIIIHH")  # header, uid, gid, flags, ngroups, argc, envc, cols, rows
_SPAWN_FIXED = struct.Struct("=IIIIIIIIIHH")  # the same with desclen after envc
_TWO = struct.Struct("=IIII")  # header + two u32: HELLO, FAILED, EXIT, ADOPTED; also SIGNAL
_ONE = struct.Struct("=III")  # header + one u32: SPAWNED; also CLOSE_STDIN
_PROCESS_FIXED = struct.Struct("=IIIIII")  # header, pid, flags, wait status, desclen
_MAX_KEPT = 1024  # corral-init.c MAX_KEPT: an ADOPT brings at most this many processes
MAX_GROUPS = 1024  # corral-init.c MAX_GROUPS
MAX_REQUEST = 1 << 20  # corral-init.c MAX_REQUEST (what its HELLO says, unless it lies)
_MAX_PID = 4194304  # PID_MAX_LIMIT on 64-bit Linux
_MAX_SIGNAL = 64
_STAGES = {
    1: "request", 2: "pty", 3: "fork", 4: "setsid", 5: "controlling terminal", 6: "stdio",
    7: "setgroups", 8: "setgid", 9: "setuid", 10: "chdir", 11: "exec",
}  # fmt: skip
_ST_CWD = 10
_CONNECT_TIMEOUT_S = 30.0
_START_TIMEOUT_S = 30.0  # a spawn the agent does not answer (frozen, stopped, or hostile)
# The largest agent message (a PROCESS): a longer one is truncated, hence refused.
_RECV_SIZE = _PROCESS_FIXED.size + MAX_DESCRIPTION
_PIPE_SIZE = 1 << 20  # output pipes of kept processes: what they write while no server reads
_F_SETPIPE_SZ = 1031  # <linux/fcntl.h>
_SNDBUF = 4 << 20  # room for one request of the agent's max_request (1 MiB) and more
_SO_SNDBUFFORCE = 32  # <asm-generic/socket.h>; Python has no name for it
_TIOCGPTN = 0x80045430  # _IOR('T', 0x30, unsigned int): the pty number, only a master answers


class AgentProtocolError(Exception):
    """The agent sent something it must not: the connection is dropped."""


@dataclasses.dataclass(frozen=True, slots=True)
class Hello:
    version: int
    max_request: int


@dataclasses.dataclass(frozen=True, slots=True)
class Spawned:
    request_id: int
    pid: int


@dataclasses.dataclass(frozen=True, slots=True)
class Failed:
    request_id: int
    stage: str
    error: int  # errno


@dataclasses.dataclass(frozen=True, slots=True)
class Exited:
    pid: int
    status: ExitStatus


@dataclasses.dataclass(frozen=True, slots=True)
class Kept:
    """A process handed over (answer to ADOPT); `status` when it exited while it had no owner."""

    request_id: int
    pid: int
    pty: bool
    stdin: bool
    status: ExitStatus | None
    description: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class AdoptEnd:
    request_id: int
    count: int


AgentMessage = Hello | Spawned | Failed | Exited | Kept | AdoptEnd


# -- the wire format (pure) ------------------------------------------------------------------------


def _cstring(text: str, what: str) -> bytes:
    data = os.fsencode(text)
    if b"\0" in data:
        raise InvalidArgument(f"{what} contains a NUL byte")
    return data + b"\0"


def encode_spawn(request_id: int, request: SpawnRequest, version: int = PROTOCOL_VERSION) -> bytes:
    """A SPAWN record for an agent of `version` (2: keep the process, with its description; the
    host's ends go along). InvalidArgument for what the kernel could not take (NUL bytes, ids)."""
    user = request.user
    groups = tuple(user.groups)
    if len(groups) > MAX_GROUPS:
        raise InvalidArgument(
            f"user '{user.name}' is in {len(groups)} groups, at most {MAX_GROUPS} are supported"
        )
    for value in (user.uid, user.gid, *groups):
        if not 0 <= value < 0xFFFFFFFF:
            raise InvalidArgument(f"user or group id out of range: {value}")
    if not request.argv:
        raise InvalidArgument("empty command")
    cols, rows = (request.pty.cols, request.pty.rows) if request.pty is not None else (0, 0)
    strings = b"".join(
        [
            _cstring(request.cwd, "cwd"),
            *(_cstring(arg, "argument") for arg in request.argv),
            *(_cstring(f"{key}={value}", "environment variable") for key, value in request.env.items()),
        ]
    )
    flags = _F_PTY if request.pty is not None else 0
    size = min(max(cols, 0), 0xFFFF), min(max(rows, 0), 0xFFFF)
    packed_groups = struct.pack(f"={len(groups)}I", *groups)
    if version < 2:
        fixed = _SPAWN_FIXED_V1.pack(
            _SPAWN, request_id, user.uid, user.gid, flags, len(groups), len(request.argv), len(request.env),
            *size,
        )  # fmt: skip
        return fixed + packed_groups + strings
    description = request.description
    if len(description) > MAX_DESCRIPTION:
        raise InvalidArgument(f"process description too large ({len(description)} bytes)")
    flags |= _F_KEEP | (_F_STDIN if request.pty is None and request.stdin else 0)
    fixed = _SPAWN_FIXED.pack(
        _SPAWN, request_id, user.uid, user.gid, flags, len(groups), len(request.argv), len(request.env),
        len(description), *size,
    )  # fmt: skip
    return fixed + packed_groups + description + strings


def encode_signal(pid: int, signum: int) -> bytes:
    return _TWO.pack(_SIGNAL, 0, pid, signum)


def encode_adopt(request_id: int) -> bytes:
    return _HEADER.pack(_ADOPT, request_id)


def encode_close_stdin(pid: int) -> bytes:
    return _ONE.pack(_CLOSE_STDIN, 0, pid)


def exit_status(status: int) -> ExitStatus:
    """ExitStatus of a wait(2) status the agent reported; AgentProtocolError for anything else."""
    if status & ~0xFFFF:
        raise AgentProtocolError(f"implausible wait status {status:#x}")
    if os.WIFEXITED(status):
        return ExitStatus(exit_code=os.WEXITSTATUS(status))
    if os.WIFSIGNALED(status) and 0 < os.WTERMSIG(status) <= _MAX_SIGNAL and not status & 0xFF00:
        return ExitStatus(exit_code=-1, signal=os.WTERMSIG(status))
    raise AgentProtocolError(f"not an exit status: {status:#x}")


def parse_message(data: bytes, flags: int = 0) -> AgentMessage:
    """One record from the agent, checked for shape and range (not yet against our state)."""
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        raise AgentProtocolError("truncated message")
    if len(data) < _HEADER.size:
        raise AgentProtocolError(f"short message ({len(data)} bytes)")
    kind, ident = _HEADER.unpack_from(data)
    if kind == _PROCESS:
        return _parse_kept(data)
    size = _ONE.size if kind == _SPAWNED else _TWO.size
    if kind not in (_HELLO, _SPAWNED, _FAILED, _EXIT, _ADOPTED) or len(data) != size:
        raise AgentProtocolError(f"unexpected message type {kind} of {len(data)} bytes")
    if kind == _SPAWNED:
        pid = _ONE.unpack(data)[2]
        if not 1 < pid <= _MAX_PID:
            raise AgentProtocolError(f"implausible pid {pid}")
        return Spawned(ident, pid)
    a, b = _TWO.unpack(data)[2:]
    if kind == _HELLO:
        return Hello(version=a, max_request=b)
    if kind == _ADOPTED:
        return AdoptEnd(ident, a)
    if kind == _FAILED:
        if a not in _STAGES or not 0 < b < 4096:
            raise AgentProtocolError(f"implausible failure (stage {a}, errno {b})")
        return Failed(ident, _STAGES[a], b)
    if not 1 < a <= _MAX_PID:
        raise AgentProtocolError(f"implausible pid {a}")
    return Exited(a, exit_status(b))


def _parse_kept(data: bytes) -> Kept:
    if len(data) < _PROCESS_FIXED.size:
        raise AgentProtocolError(f"short PROCESS message ({len(data)} bytes)")
    _, ident, pid, flags, status, desclen = _PROCESS_FIXED.unpack_from(data)
    if desclen > MAX_DESCRIPTION or len(data) != _PROCESS_FIXED.size + desclen:
        raise AgentProtocolError(f"PROCESS message of {len(data)} bytes with a description of {desclen}")
    if not 1 < pid <= _MAX_PID:
        raise AgentProtocolError(f"implausible pid {pid}")
    if flags & ~(_P_PTY | _P_EXITED | _P_STDIN) or flags & _P_PTY and flags & _P_STDIN:
        raise AgentProtocolError(f"implausible process flags {flags:#x}")
    if not flags & _P_EXITED and status:
        raise AgentProtocolError("an exit status for a running process")
    return Kept(
        ident, pid, pty=bool(flags & _P_PTY), stdin=bool(flags & _P_STDIN),
        status=exit_status(status) if flags & _P_EXITED else None, description=data[_PROCESS_FIXED.size :],
    )  # fmt: skip


def _check_pipe_end(fd: int, mode: int) -> None:
    """The fd must be a pipe end opened for `mode` (O_RDONLY or O_WRONLY); AgentProtocolError if not."""
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode) or fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != mode:
            raise AgentProtocolError("a process's fd is not a pipe end of the right direction")
    except OSError as exc:
        raise AgentProtocolError(f"a process's fd is not a pipe end: {exc.strerror}") from None


def _check_pty_master(fd: int) -> None:
    """The fd must be a pty master (the ptmx device of a devpts instance); AgentProtocolError if not."""
    try:
        mode = os.fstat(fd)
        if not stat.S_ISCHR(mode.st_mode) or (os.major(mode.st_rdev), os.minor(mode.st_rdev)) != (5, 2):
            raise AgentProtocolError("the pty fd is not a pty master")
        fcntl.ioctl(fd, _TIOCGPTN, b"\0\0\0\0")
    except OSError as exc:
        raise AgentProtocolError(f"the pty fd is not a pty master: {exc.strerror}") from None


# -- the socket ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _unix_address(path: Path) -> Iterator[str]:
    """An address for `path` that fits sockaddr_un (108 bytes): itself, or through an O_PATH fd
    of its directory when the home is deep."""
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    dir_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{dir_fd}/{path.name}"
    finally:
        os.close(dir_fd)


def listen_agent_socket(path: Path) -> socket.socket:
    """A listening socket at `path` (any old one replaced) for the sandbox's init (fd 3), mode
    0600 from the start (the mode is set on the socket before bind), so only host root connects."""
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        os.fchmod(sock.fileno(), 0o600)
        with _unix_address(path) as address:
            sock.bind(address)
        sock.listen(8)
    except BaseException:
        sock.close()
        raise
    return sock


# -- processes and the connection -------------------------------------------------------------------


class AgentProcess(ProcessIo):
    """A command the agent started (implements `corral.node.runtime.base.SpawnedProcess`).

    Its exit comes as an EXIT message on the connection (or, when the connection is lost, as
    SIGKILL: the sandbox is gone). Output and input are our ends of its pipes, or the pty master.
    `kept`: the agent holds copies of them (so closing stdin must tell it); `description`: what the
    spawn request said about it (for a process handed over after a restart).
    """

    def __init__(
        self,
        connection: AgentConnection,
        pid: int,
        *,
        stdin_fd: int | None = None,
        stdout_fd: int | None = None,
        stderr_fd: int | None = None,
        pty_fd: int | None = None,
        kept: bool = False,
        description: bytes = b"",
    ) -> None:
        super().__init__(stdin_fd=stdin_fd, stdout_fd=stdout_fd, stderr_fd=stderr_fd, pty_fd=pty_fd)
        self._connection = connection
        self.pid = pid
        self.kept = kept
        self.description = description
        self._exit: asyncio.Future[ExitStatus] = asyncio.get_running_loop().create_future()

    def close_stdin(self) -> None:
        had_stdin = self.stdin_fd is not None
        super().close_stdin()
        if had_stdin and self.kept and not self._exit.done():
            self._connection.close_stdin(self.pid)

    def send_signal(self, signum: int) -> None:
        """The agent signals the process and its process group, while the process is unreaped
        (so the pid cannot have been recycled)."""
        if not self._exit.done():
            self._connection.signal(self.pid, signum)

    async def wait(self) -> ExitStatus:
        return await asyncio.shield(self._exit)

    def exited(self, status: ExitStatus) -> None:
        if not self._exit.done():
            self._exit.set_result(status)

    def close(self) -> None:
        for name in ("stdin_fd", "stdout_fd", "stderr_fd", "pty_fd"):
            fd = getattr(self, name)
            if fd is not None:
                setattr(self, name, None)
                with contextlib.suppress(OSError):
                    self._release(fd)


class _Stdio:
    """The pipes of one spawn: our ends (kept, non-blocking) and the child's (sent, then closed).
    `keep`: the agent keeps copies of our ends (`to_send`), and output pipes get `_PIPE_SIZE`."""

    def __init__(self, request: SpawnRequest, keep: bool = False) -> None:
        self.ours: dict[str, int] = {}
        self.theirs: list[int] = []
        self.keep = keep and request.pty is None
        if request.pty is not None:
            return
        try:
            if request.stdin:
                r, w = os.pipe2(os.O_CLOEXEC)
                self.theirs.append(r)
                self.ours["stdin"] = w
            else:
                self.theirs.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            for name in ("stdout", "stderr"):
                r, w = os.pipe2(os.O_CLOEXEC)
                self.theirs.append(w)
                self.ours[name] = r
        except BaseException:
            self.close()
            raise
        for fd in self.ours.values():
            os.set_blocking(fd, False)
        if self.keep:
            for name in ("stdout", "stderr"):
                with contextlib.suppress(OSError):  # EPERM over the user's pipe quota: the default size
                    fcntl.fcntl(self.ours[name], _F_SETPIPE_SZ, _PIPE_SIZE)

    def to_send(self) -> list[int]:
        """What goes with the SPAWN, for the outbox to close once sent: the child's ends, then
        copies of ours in the agent's order (stdout, stderr, stdin)."""
        fds, self.theirs = self.theirs, []
        if self.keep:
            try:
                fds += [os.dup(self.ours[n]) for n in ("stdout", "stderr", "stdin") if n in self.ours]
            except BaseException:
                _close_all(fds)
                raise
        return fds

    def close_theirs(self) -> None:
        for fd in self.theirs:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.theirs = []

    def close(self) -> None:
        self.close_theirs()
        for fd in self.ours.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.ours = {}


@dataclasses.dataclass(eq=False)
class _Pending:
    request: SpawnRequest
    stdio: _Stdio
    reply: asyncio.Future[AgentProcess]
    abandoned: bool = False  # the caller stopped waiting (cancelled)

    def fail(self, error: Exception) -> None:
        self.stdio.close()
        if not self.abandoned and not self.reply.done():
            self.reply.set_exception(error)


@dataclasses.dataclass(eq=False)
class _Adoption:
    """An ADOPT under way: the processes handed over so far."""

    reply: asyncio.Future[list[AgentProcess]]
    processes: list[AgentProcess] = dataclasses.field(default_factory=list)


class AgentConnection:
    """One connection to a sandbox's agent: requests out, answers and exits in (all on the loop).
    `adopted`: the processes `open` was handed (their connection was gone), for the caller to take."""

    def __init__(self, sock: socket.socket, sandbox: str) -> None:
        self._sock = sock
        self._sandbox = sandbox
        self._loop = asyncio.get_running_loop()
        self.hello: asyncio.Future[Hello] = self._loop.create_future()
        self._pending: dict[int, _Pending] = {}
        self._adoptions: dict[int, _Adoption] = {}
        self._processes: dict[int, AgentProcess] = {}
        self._outbox: collections.deque[tuple[bytes, list[int]]] = collections.deque()
        self._next_id = 0
        self.closed = False
        self.adopted: list[AgentProcess] = []
        self._loop.add_reader(sock.fileno(), self._on_readable)

    @property
    def keeps(self) -> bool:
        """Whether the agent keeps processes for a restarted server (protocol 2)."""
        return self.hello.done() and not self.hello.exception() and self.hello.result().version >= 2

    @classmethod
    async def open(cls, path: Path, sandbox: str) -> AgentConnection:
        """Connect and wait for the agent's HELLO. Internal when it is not there or not ours."""
        sock = socket.socket(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, _SNDBUF)
            except PermissionError:  # not root: as much as net.core.wmem_max allows
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
            with _unix_address(path) as address:
                async with asyncio.timeout(_CONNECT_TIMEOUT_S):
                    await asyncio.get_running_loop().sock_connect(sock, address)
        except (OSError, TimeoutError) as exc:
            sock.close()
            raise Internal(
                f"could not start process: sandbox {sandbox}'s exec agent is not reachable ({exc})"
            ) from None
        except BaseException:  # cancelled
            sock.close()
            raise
        connection = cls(sock, sandbox)
        try:
            async with asyncio.timeout(_CONNECT_TIMEOUT_S):
                hello = await asyncio.shield(connection.hello)
        except BaseException:
            connection.close()
            raise
        if hello.version not in _VERSIONS:
            connection.close()
            raise Internal(
                f"could not start process: sandbox {sandbox}'s exec agent speaks version {hello.version}, "
                f"not {PROTOCOL_VERSION} (rebuild it with scripts/bootstrap.sh and restart the sandbox)"
            )
        if connection.keeps:
            try:
                async with asyncio.timeout(_CONNECT_TIMEOUT_S):
                    connection.adopted = await connection.adopt()
            except BaseException as exc:
                connection.close()
                if isinstance(exc, TimeoutError):
                    raise Internal(
                        f"could not start process: sandbox {sandbox}'s exec agent did not hand over its processes"
                    ) from None
                raise
        return connection

    async def adopt(self) -> list[AgentProcess]:
        """Take over the processes whose connection is gone (those that exited meanwhile come
        with their exit status)."""
        if self.closed:
            raise Internal(f"lost the connection to sandbox {self._sandbox}'s exec agent")
        request_id = self._new_id()
        adoption = _Adoption(self._loop.create_future())
        self._adoptions[request_id] = adoption
        self._send(encode_adopt(request_id), [])
        return await asyncio.shield(adoption.reply)

    def _new_id(self) -> int:
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        return self._next_id

    # -- requests

    async def spawn(self, request: SpawnRequest) -> AgentProcess:
        if self.closed:
            raise Internal(
                f"could not start process: lost the connection to sandbox {self._sandbox}'s exec agent"
            )
        request_id = self._new_id()
        hello = self.hello.result()
        message = encode_spawn(request_id, request, hello.version)
        if len(message) > min(hello.max_request, MAX_REQUEST):
            raise InvalidArgument(f"command line and environment too large ({len(message)} bytes)")
        stdio = _Stdio(request, keep=hello.version >= 2)
        pending = _Pending(request, stdio, self._loop.create_future())
        self._pending[request_id] = pending
        self._send(message, stdio.to_send())  # the outbox owns these now
        try:
            async with asyncio.timeout(_START_TIMEOUT_S):
                return await asyncio.shield(pending.reply)
        except (asyncio.CancelledError, TimeoutError) as exc:
            pending.abandoned = True  # an answer may still come: `_dispatch` kills the process then
            pending.stdio.close()
            if isinstance(exc, TimeoutError):
                raise Internal(
                    f"could not start process: sandbox {self._sandbox}'s exec agent did not answer"
                ) from None
            raise

    def signal(self, pid: int, signum: int) -> None:
        if not self.closed and 0 < signum <= _MAX_SIGNAL:
            self._send(encode_signal(pid, signum), [])

    def close_stdin(self, pid: int) -> None:
        if not self.closed:
            self._send(encode_close_stdin(pid), [])

    def _send(self, message: bytes, fds: list[int]) -> None:
        """Send now, or queue while the socket is full; `fds` (the child's ends) are closed once sent."""
        if self.closed:
            _close_all(fds)
            return
        self._outbox.append((message, fds))
        if len(self._outbox) == 1:
            self._flush()

    def _flush(self) -> None:
        while self._outbox and not self.closed:
            message, fds = self._outbox[0]
            try:
                socket.send_fds(self._sock, [message], fds) if fds else self._sock.send(message)
            except BlockingIOError:
                self._loop.add_writer(self._sock.fileno(), self._on_writable)
                return
            except OSError as exc:
                self._lost(f"send failed: {exc.strerror}")
                return
            self._outbox.popleft()
            _close_all(fds)

    def _on_writable(self) -> None:
        self._loop.remove_writer(self._sock.fileno())
        self._flush()

    # -- what the agent says

    def _on_readable(self) -> None:
        for _ in range(64):  # then let others run; the reader fires again
            try:
                data, fds, flags, _ = socket.recv_fds(self._sock, _RECV_SIZE, 3, socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                return
            except OSError as exc:
                self._lost(f"receive failed: {exc.strerror}")
                return
            if not data and not fds:
                self._lost("the sandbox's exec agent closed the connection")
                return
            try:
                self._dispatch(parse_message(data, flags), fds)
            except Exception as exc:  # AgentProtocolError, or a bug here: never leave waits hanging
                _close_all(fds)
                if isinstance(exc, AgentProtocolError):
                    log.warning(
                        "sandbox %s: exec agent protocol violation: %s; dropping the connection",
                        self._sandbox,
                        exc,
                    )
                else:
                    log.exception("sandbox %s: failed to handle an exec agent message", self._sandbox)
                self._lost(f"the sandbox's exec agent misbehaved ({exc})")
                return

    def _dispatch(self, message: AgentMessage, fds: list[int]) -> None:
        """Apply one message; takes `fds` (closes what it does not keep)."""
        if isinstance(message, Hello):
            if self.hello.done() or fds:
                raise AgentProtocolError("unexpected HELLO")
            self.hello.set_result(message)
            return
        if not self.hello.done():
            raise AgentProtocolError("no HELLO first")
        if isinstance(message, Exited):
            proc = self._processes.pop(message.pid, None)
            if proc is None or fds:
                raise AgentProtocolError(f"EXIT of unknown pid {message.pid}")
            proc.exited(message.status)
            return
        if isinstance(message, (Kept, AdoptEnd)):
            self._dispatch_adoption(message, fds)
            return
        pending = self._pending.get(message.request_id)
        if pending is None:
            raise AgentProtocolError(f"answer to unknown request {message.request_id}")
        pty = pending.request.pty is not None
        if isinstance(message, Failed):
            if fds:
                raise AgentProtocolError("fds with FAILED")
            del self._pending[message.request_id]
            pending.fail(_spawn_error(message, pending.request))
            return
        if message.pid in self._processes or len(fds) != (1 if pty else 0):
            raise AgentProtocolError(f"SPAWNED with pid {message.pid} in use or with {len(fds)} fds")
        if pty:
            _check_pty_master(fds[0])
            os.set_blocking(fds[0], False)
        del self._pending[message.request_id]
        ours = pending.stdio.ours
        proc = AgentProcess(
            self, message.pid, stdin_fd=ours.get("stdin"), stdout_fd=ours.get("stdout"),
            stderr_fd=ours.get("stderr"), pty_fd=fds[0] if pty else None, kept=self.keeps,
            description=pending.request.description,
        )  # fmt: skip
        pending.stdio.ours = {}
        self._processes[message.pid] = proc
        if pending.abandoned:  # nobody will wait for this process
            proc.send_signal(signal.SIGKILL)
            proc.close()
        else:
            pending.reply.set_result(proc)

    def _dispatch_adoption(self, message: Kept | AdoptEnd, fds: list[int]) -> None:
        adoption = self._adoptions.get(message.request_id)
        if adoption is None:
            raise AgentProtocolError(f"answer to unknown request {message.request_id}")
        if isinstance(message, AdoptEnd):
            if fds or message.count != len(adoption.processes):
                raise AgentProtocolError(f"ADOPTED says {message.count}, {len(adoption.processes)} came")
            del self._adoptions[message.request_id]
            adoption.reply.set_result(adoption.processes)
            return
        if message.pid in self._processes or any(p.pid == message.pid for p in adoption.processes):
            raise AgentProtocolError(f"PROCESS with pid {message.pid} in use")
        if len(adoption.processes) >= _MAX_KEPT:
            raise AgentProtocolError(f"more than {_MAX_KEPT} processes handed over")
        if message.pty:
            if len(fds) != 1:
                raise AgentProtocolError(f"PROCESS of a pty with {len(fds)} fds")
            _check_pty_master(fds[0])
            ends = {"pty_fd": fds[0]}
        else:
            if len(fds) != (3 if message.stdin else 2):
                raise AgentProtocolError(f"PROCESS with {len(fds)} fds")
            modes = (os.O_RDONLY, os.O_RDONLY, os.O_WRONLY)
            for fd, mode in zip(fds, modes, strict=False):
                _check_pipe_end(fd, mode)
            ends = dict(zip(("stdout_fd", "stderr_fd", "stdin_fd"), fds, strict=False))
        for fd in fds:
            os.set_blocking(fd, False)
        proc = AgentProcess(self, message.pid, kept=True, description=message.description, **ends)
        if message.status is not None:  # exited while nobody owned it: the agent forgot it
            proc.exited(message.status)
        else:
            self._processes[message.pid] = proc
        adoption.processes.append(proc)

    def _lost(self, reason: str) -> None:
        """The connection is over: pending spawns fail, running processes end as killed."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._sock.fileno())
            self._loop.remove_writer(self._sock.fileno())
        self._sock.close()
        for _, fds in self._outbox:
            _close_all(fds)
        self._outbox.clear()
        if not self.hello.done():
            self.hello.set_exception(Internal(f"could not start process: {reason}"))
        pending, self._pending = self._pending, {}
        for item in pending.values():
            item.fail(Internal(f"could not start process: {reason}"))
        adoptions, self._adoptions = self._adoptions, {}
        for adoption in adoptions.values():
            for proc in adoption.processes:
                proc.close()
            adoption.reply.set_exception(Internal(f"could not take over processes: {reason}"))
            adoption.reply.exception()  # retrieved: nobody may wait for it any more
        processes, self._processes = self._processes, {}
        for proc in processes.values():
            proc.exited(ExitStatus(exit_code=-1, signal=signal.SIGKILL))

    def close(self) -> None:
        self._lost("the connection was closed")


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _spawn_error(failed: Failed, request: SpawnRequest) -> Exception:
    reason = os.strerror(failed.error)
    if failed.stage == _STAGES[_ST_CWD]:
        if failed.error in (errno.ENOENT, errno.ENOTDIR):
            return InvalidArgument(f"cwd '{request.cwd}' does not exist")
        return InvalidArgument(f"cannot use cwd '{request.cwd}' as user '{request.user.name}': {reason}")
    if failed.stage == "request" and failed.error == errno.E2BIG:
        return InvalidArgument("command line and environment too large")
    return Internal(f"could not start process '{request.argv[0]}': {reason} ({failed.stage})")


class AgentSpawner:
    """Starts processes in one sandbox through its agent (implements `corral.node.runtime.base.Spawner`).

    `on_adopted(processes)` takes the processes each new connection is handed (those of a server
    that is gone); without it they are let go (they run on, kept by the agent).
    """

    def __init__(
        self,
        socket_path: Path,
        sandbox_id: str,
        on_adopted: Callable[[list[AgentProcess]], None] | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.sandbox_id = sandbox_id
        self.on_adopted = on_adopted
        self._connection: AgentConnection | None = None
        self._connecting = asyncio.Lock()
        self._closed = False
        # Connect now, in the background, so that the first command does not wait for it (the
        # warm pool boots sandboxes ahead: their first command is the one a user waits for).
        self._warming = asyncio.get_running_loop().create_task(self._warm_up())

    async def _warm_up(self) -> None:
        with contextlib.suppress(Exception):  # the first spawn tries again and says why
            await self._connected()

    async def _connected(self) -> AgentConnection:
        async with self._connecting:
            if self._closed:
                raise Internal(f"could not start process: sandbox {self.sandbox_id} is not running here")
            if self._connection is None or self._connection.closed:
                self._connection = connection = await AgentConnection.open(self.socket_path, self.sandbox_id)
                adopted, connection.adopted = connection.adopted, []
                if adopted:
                    self._hand_over(adopted)
            return self._connection

    def _hand_over(self, adopted: list[AgentProcess]) -> None:
        try:
            if self.on_adopted is not None:
                self.on_adopted(adopted)
                return
        except Exception:
            log.exception("sandbox %s: taking over its processes failed", self.sandbox_id)
        for proc in adopted:
            proc.close()

    async def ready(self) -> None:
        """Connect now unless connected (and so take over processes a gone server left); errors are
        left for the next spawn to report."""
        with contextlib.suppress(Exception):
            await self._connected()

    async def spawn(self, request: SpawnRequest) -> AgentProcess:
        return await (await self._connected()).spawn(request)

    def close(self) -> None:
        """Drop the connection (the sandbox goes on); its processes' waits end."""
        self._closed = True
        self._warming.cancel()
        if self._connection is not None:
            self._connection.close()

"""envd `process.Process`: processes started in a sandbox, their output fan-out, and the Connect service.

A `ManagedProcess` pumps the output of one process to its current subscribers, each a bounded
`OutputChannel`: a slow client slows the process down (the pipe fills and the process blocks on
write) instead of growing server memory; with no subscriber the output is dropped and the process
keeps running. A client that goes away never kills a process; only SendSignal, the process's
lifetime limit (`connect-timeout-ms` on Start) or the sandbox's end do. Ended processes stay
connectable for `RETAIN_ENDED_S`.

Lifecycle of a ManagedProcess: running (`status is None`) → output EOF and exit status both seen
(or, after a kill, exit status seen: descendants that keep the pipes open do not hold the end
back) → `end` published to every subscriber → retained for `RETAIN_ENDED_S` → forgotten.

After a server restart: where the runtime keeps processes for the next server (the exec agent),
each Start hands it a description of the process (`describe_process`: the E2B config, tag, pty,
lifetime deadline), and the new server's `ProcessTable.adopt` rebuilds the process from it, so
List, Connect, SendInput, SendSignal and Update work on it as before. Its output was left in the
pipe while no server ran; it is not read (so not dropped) until the first Connect, or for at most
`ADOPTED_HOLD_S` (then, as for any process, output nobody is subscribed to is dropped).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import contextvars
import json
import logging
import signal
import stat
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from protobuf import Oneof

from corral.core.errors import CorralError, FailedPrecondition, InvalidArgument, NotFound
from corral.core.sandbox import DEFAULT_USER
from corral.node.envd.context import EnvdSandbox
from corral.node.runtime._fdio import read_chunk
from corral.node.runtime.base import (
    MAX_DESCRIPTION,
    ExitStatus,
    PtySize,
    SpawnedProcess,
    SpawnRequest,
    UserIds,
)
from corral.spec._generated.process import process_connect
from corral.spec._generated.process import process_pb as pb

__all__ = [
    "ADOPTED_HOLD_S",
    "DEFAULT_KEEPALIVE_S",
    "END_OF_STREAM_FOLLOWS",
    "RETAIN_ENDED_S",
    "ManagedProcess",
    "OutputChannel",
    "ProcessService",
    "ProcessTable",
    "SandboxGone",
    "acting_username",
    "connect_error",
    "describe_process",
    "read_description",
    "resolve_cwd",
]

log = logging.getLogger(__name__)

RETAIN_ENDED_S = 30.0
ADOPTED_HOLD_S = 120.0  # an adopted process's output waits this long for a Connect before it is read
DEFAULT_KEEPALIVE_S = 90.0
CHANNEL_CHUNKS = 16  # per subscriber: at most 16 reads (≤ 64 KiB each) waiting to be sent
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_SIGNALS = {pb.Signal.SIGKILL: signal.SIGKILL, pb.Signal.SIGTERM: signal.SIGTERM}

# Set while a stream yields its last message (a process's end): the Connect end-of-stream follows
# at once, so the proxy may hold that message and send both together (one write, one wake-up of
# the client instead of two). Per request: each ASGI request runs in its own context.
END_OF_STREAM_FOLLOWS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "corral_envd_end_of_stream_follows", default=False
)


class SandboxGone(Exception):
    """The sandbox ended while a request was using it; its streams are cut at the transport level."""


class _Data:
    __slots__ = ("data", "stream")

    def __init__(self, stream: str, data: bytes) -> None:
        self.stream = stream  # stdout | stderr | pty
        self.data = data


class _End:
    __slots__ = ("status",)

    def __init__(self, status: ExitStatus) -> None:
        self.status = status


_IDLE = object()  # OutputChannel.receive timed out


class OutputChannel:
    """One subscriber's bounded queue of process output, then the end.

    `send` waits while the channel is full (back-pressure on the pump) and gives up, dropping the
    item, once the receiver has gone (`close`). Items live in the deque until `receive` takes them,
    so a receive that times out or is cancelled never loses one. `abort` (sandbox gone) makes the
    next `receive` raise `SandboxGone` whatever is still queued.
    """

    def __init__(self, limit: int = CHANNEL_CHUNKS) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._limit = limit
        self._closed = False
        self._aborted = False
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()

    async def send(self, item: Any) -> None:
        while len(self._items) >= self._limit and not self._closed:
            self._writable.clear()
            await self._writable.wait()
        self.send_final(item)

    def send_final(self, item: Any) -> None:
        """Queue without waiting (the end: it must follow the data, and it is tiny)."""
        if not self._closed:
            self._items.append(item)
            self._readable.set()

    async def receive(self, timeout: float | None) -> Any:
        """The next item, or `_IDLE` when none came within `timeout` seconds."""
        while not self._items and not self._aborted:
            self._readable.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._readable.wait()
            except TimeoutError:
                return _IDLE
        if self._aborted:
            raise SandboxGone()
        item = self._items.popleft()
        self._writable.set()
        return item

    def close(self) -> None:
        """The receiver went away: drop what is queued and never block a sender again."""
        self._closed = True
        self._items.clear()
        self._writable.set()

    def abort(self) -> None:
        self._aborted = True
        self._readable.set()
        self.close()


def describe_process(config: pb.ProcessConfig, tag: str | None, pty: bool, deadline: float | None) -> bytes:
    """What the runtime keeps for a restarted server (`read_description` reads it back): the E2B
    config, tag, pty, and the lifetime deadline (wall clock). At most MAX_DESCRIPTION bytes: envs,
    then args are left out of one that is larger."""
    fields: dict[str, Any] = {
        "cmd": config.cmd, "args": list(config.args), "envs": dict(config.envs),
        "cwd": _optional(config, "cwd"), "tag": tag, "pty": pty, "deadline": deadline,
    }  # fmt: skip
    for drop in ((), ("envs",), ("envs", "args")):
        data = json.dumps({k: v for k, v in fields.items() if k not in drop}, separators=(",", ":")).encode()
        if len(data) <= MAX_DESCRIPTION:
            return data
    fields = {"cmd": config.cmd[:1024], "tag": tag[:1024] if tag else tag, "pty": pty, "deadline": deadline}
    return json.dumps(fields).encode()


def read_description(data: bytes) -> tuple[pb.ProcessConfig, str | None, bool, float | None]:
    """(config, tag, pty, deadline) of a `describe_process` description. It comes back from inside
    the sandbox: anything malformed reads as an empty config (nothing is raised)."""
    try:
        fields = json.loads(data)
    except ValueError:  # also UnicodeDecodeError
        fields = None
    if not isinstance(fields, dict) or not _plausible_description(fields):
        return pb.ProcessConfig(), None, False, None
    config = pb.ProcessConfig(
        cmd=fields.get("cmd", ""), args=fields.get("args", []), envs=fields.get("envs", {})
    )
    if fields.get("cwd") is not None:
        config.cwd = fields["cwd"]
    deadline = fields.get("deadline")
    return config, fields.get("tag"), fields.get("pty", False), None if deadline is None else float(deadline)


def _plausible_description(fields: dict[str, Any]) -> bool:
    args, envs, deadline = fields.get("args", []), fields.get("envs", {}), fields.get("deadline")
    return (
        isinstance(fields.get("cmd", ""), str)
        and isinstance(args, list) and all(isinstance(arg, str) for arg in args)
        and isinstance(envs, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in envs.items())
        and all(isinstance(fields.get(key), str | None) for key in ("cwd", "tag"))
        and isinstance(fields.get("pty", False), bool)
        and (deadline is None or (isinstance(deadline, int | float) and not isinstance(deadline, bool)))
    )  # fmt: skip


class ManagedProcess:
    """`hold_output_s`: output is not read before the first subscriber comes, for at most this long
    (an adopted process, whose output waited in its pipe for the next server)."""

    def __init__(
        self,
        proc: SpawnedProcess,
        config: pb.ProcessConfig,
        tag: str | None,
        pty: bool,
        hold_output_s: float | None = None,
    ) -> None:
        self.proc = proc
        self.pid: int = proc.pid
        self.config = config
        self.tag = tag
        self.is_pty = pty
        self.status: ExitStatus | None = None
        self.ended_at: float | None = None
        self.lifetime_expired = False
        self._killed = asyncio.Event()  # a terminating signal was sent: stop waiting for output EOF
        self._subscribers: set[OutputChannel] = set()
        self.done = asyncio.Event()
        self.adopted = hold_output_s is not None
        self.exit_seen = False  # the runtime reported the exit (output may still be coming)
        self._hold_output_s = hold_output_s
        self._subscribed = asyncio.Event()
        if hold_output_s is None:
            self._subscribed.set()

    @property
    def running(self) -> bool:
        return self.status is None

    def subscribe(self) -> OutputChannel:
        channel = OutputChannel()
        if self.status is not None:
            channel.send_final(_End(self.status))
        else:
            self._subscribers.add(channel)
            self._subscribed.set()
        return channel

    def unsubscribe(self, channel: OutputChannel) -> None:
        self._subscribers.discard(channel)
        channel.close()

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)
        if signum in (signal.SIGKILL, signal.SIGTERM):
            self._killed.set()

    async def _copy(self, stream: str, fd: int) -> None:
        if not self._subscribed.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._hold_output_s):
                    await self._subscribed.wait()
        while chunk := await read_chunk(fd):
            item = _Data(stream, chunk)
            for channel in list(self._subscribers):
                await channel.send(item)

    async def pump(self) -> None:
        """Copy output to subscribers until EOF and exit, then publish the end. Owned by the ProcessTable."""
        status = ExitStatus(exit_code=-1, signal=signal.SIGKILL)
        try:
            async with asyncio.TaskGroup() as tg:
                copies = [tg.create_task(self._copy(stream, fd)) for stream, fd in self.proc.output_fds()]
                status = await self.proc.wait()
                self.exit_seen = True
                if copies:
                    output_done = asyncio.ensure_future(asyncio.wait(copies))
                    killed = asyncio.ensure_future(self._killed.wait())
                    try:
                        await asyncio.wait({output_done, killed}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        output_done.cancel()
                        killed.cancel()
                    # Killed: children that inherited the pipes must not keep the stream open (envd
                    # stops reading too); what they write from now on is not delivered.
                    for copy in copies:
                        copy.cancel()
        except* Exception:
            log.exception("process %d: output pump failed", self.pid)
        finally:
            self.proc.close()
            self.status = status
            self.ended_at = time.monotonic()
            subscribers, self._subscribers = self._subscribers, set()
            for channel in subscribers:
                channel.send_final(_End(status))
            self.done.set()

    def gone(self) -> None:
        """The sandbox is gone: cut every subscriber's stream."""
        subscribers, self._subscribers = self._subscribers, set()
        for channel in subscribers:
            channel.abort()


class ProcessTable:
    """Processes started through envd in one sandbox. Owns their pump and lifetime tasks."""

    def __init__(self) -> None:
        self._by_pid: dict[int, ManagedProcess] = {}
        self._ended: collections.deque[ManagedProcess] = collections.deque()  # in the order they ended
        self._pumps: set[asyncio.Task[None]] = set()
        self._timers: set[asyncio.TimerHandle] = set()  # lifetime limits (a timer, not a task each)
        self.closed = False

    def _own(self, tasks: set[asyncio.Task[None]], coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def add(self, mp: ManagedProcess, lifetime_s: float | None) -> None:
        self._prune()
        self._by_pid[mp.pid] = mp
        timer = None
        if lifetime_s is not None:
            timer = asyncio.get_running_loop().call_later(lifetime_s, self._lifetime_reached, mp)
            self._timers.add(timer)
        self._own(self._pumps, self._pump(mp, timer))

    def adopt(self, proc: SpawnedProcess, description: bytes) -> ManagedProcess:
        """A process a previous server started, as its description says (see `describe_process`);
        its lifetime limit, if it had one, still ends it at the same time."""
        config, tag, pty, deadline = read_description(description)
        lifetime = None if deadline is None else max(0.0, deadline - time.time())
        mp = ManagedProcess(proc, config, tag, pty, hold_output_s=ADOPTED_HOLD_S)
        self.add(mp, lifetime)
        return mp

    def adopt_all(self, procs: Sequence[SpawnedProcess]) -> None:
        """`adopt` each, with the description it carries (`AgentProcess.description`)."""
        for proc in procs:
            if self.closed:
                proc.close()
            else:
                self.adopt(proc, getattr(proc, "description", b""))

    def _lifetime_reached(self, mp: ManagedProcess) -> None:
        if not mp.done.is_set():
            mp.lifetime_expired = True
            mp.send_signal(signal.SIGKILL)

    async def _pump(self, mp: ManagedProcess, timer: asyncio.TimerHandle | None) -> None:
        try:
            await mp.pump()
        finally:
            if timer is not None:
                timer.cancel()
                self._timers.discard(timer)
            self._ended.append(mp)

    def _prune(self) -> None:
        """Forget processes that ended more than RETAIN_ENDED_S ago (oldest first: no full scan,
        which at hundreds of commands a minute cost more than the rest of a Start)."""
        horizon = time.monotonic() - RETAIN_ENDED_S
        while self._ended and (self._ended[0].ended_at or 0.0) < horizon:
            mp = self._ended.popleft()
            if self._by_pid.get(mp.pid) is mp:  # not a newer process that reused the pid
                del self._by_pid[mp.pid]

    def select(self, selector: pb.ProcessSelector | None, *, include_ended: bool = False) -> ManagedProcess:
        """The process a selector names: running ones, or also recently ended ones (for Connect)."""
        self._prune()
        match selector.selector if selector is not None else None:
            case Oneof(field="pid", value=pid):
                mp = self._by_pid.get(pid)
                if mp is not None and (include_ended or mp.running):
                    return mp
                raise NotFound(f"process with pid {pid} not found")
            case Oneof(field="tag", value=tag):
                matches = [
                    mp for mp in self._by_pid.values() if mp.tag == tag and (include_ended or mp.running)
                ]
                if matches:
                    # A running one first, else the one that ended last.
                    return max(matches, key=lambda mp: (mp.running, mp.ended_at or 0.0))
                raise NotFound(f"process with tag {tag} not found")
        raise InvalidArgument("process selector is required")

    def running(self) -> list[ManagedProcess]:
        """Running processes (an adopted one that exited while no server ran is not, though its
        output may still wait for a Connect)."""
        return [mp for mp in self._by_pid.values() if mp.running and not (mp.adopted and mp.exit_seen)]

    def close(self) -> None:
        """The sandbox is gone (or the server stops): cut every stream.

        Pumps keep running until their runtime process exits (the sandbox is being torn down), so
        that it is reaped; the lifetime timers stop.
        """
        self.closed = True
        for mp in self._by_pid.values():
            mp.gone()
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        self._by_pid.clear()
        self._ended.clear()


def connect_error(exc: CorralError) -> ConnectError:
    """Our error → a Connect error with the same code (one mapping: the code names are shared)."""
    return ConnectError(Code[exc.code.upper()], exc.message)


def acting_username(headers: Mapping[str, str], default: str = DEFAULT_USER) -> str:
    """`Authorization: Basic base64("<user>:")` selects the user; no header means the default user."""
    value = headers.get("authorization", "")
    if not value.lower().startswith("basic "):
        return default
    try:
        decoded = base64.b64decode(value[6:].strip()).decode()
    except ValueError:
        raise ConnectError(Code.UNAUTHENTICATED, "invalid authorization header") from None
    return decoded.split(":", 1)[0] or default


def resolve_cwd(cwd: str | None, home: str, workdir: str | None = None) -> str:
    """envd's rule: empty → the template's workdir or $HOME, `~` and `~/x` expanded, relative → $HOME/<cwd>."""
    if not cwd:
        return workdir or home
    if cwd == "~" or cwd.startswith("~/"):
        cwd = home + cwd[1:]
    if not cwd.startswith("/"):
        cwd = f"{home.rstrip('/')}/{cwd}"
    return cwd


def _keepalive_seconds(headers: Mapping[str, str]) -> float:
    try:
        return max(1.0, float(headers.get("keepalive-ping-interval", DEFAULT_KEEPALIVE_S)))
    except ValueError:
        return DEFAULT_KEEPALIVE_S


def _end_event(status: ExitStatus) -> pb.ProcessEvent:
    end = pb.ProcessEvent.EndEvent(
        exit_code=status.exit_code, exited=status.signal is None, status=status.status
    )
    if status.exit_code != 0 or status.signal is not None:
        end.error = status.status
    return pb.ProcessEvent(event=Oneof("end", end))


def _data_event(item: _Data) -> pb.ProcessEvent:
    return pb.ProcessEvent(
        event=Oneof("data", pb.ProcessEvent.DataEvent(output=Oneof(item.stream, item.data)))
    )


def _optional(message: Any, field: str) -> Any:
    """A proto3 `optional` scalar: None when absent (protobuf-py reads an absent one as its default)."""
    return getattr(message, field) if message.has_field(field) else None


class ProcessService(process_connect.Process):
    """The `process.Process` Connect service for every sandbox on this node.

    `lookup(headers)` returns the sandbox a request is for (the proxy sets `e2b-sandbox-id`);
    `lookup_user(root, name)` the sandbox user a request acts as.
    """

    def __init__(self, lookup: Any, lookup_user: Any) -> None:
        self._lookup = lookup
        self._lookup_user = lookup_user

    def _sandbox(self, ctx: Any) -> EnvdSandbox:
        try:
            return self._lookup(ctx.request_headers)
        except CorralError as exc:
            raise connect_error(exc) from None

    def _user(self, sandbox: EnvdSandbox, ctx: Any) -> UserIds:
        try:
            return self._lookup_user(sandbox.root, acting_username(ctx.request_headers, sandbox.default_user))
        except CorralError as exc:
            raise connect_error(exc) from None

    def _select(
        self, ctx: Any, selector: pb.ProcessSelector | None, *, include_ended: bool = False
    ) -> ManagedProcess:
        try:
            return self._sandbox(ctx).processes.select(selector, include_ended=include_ended)
        except CorralError as exc:
            raise connect_error(exc) from None

    async def _stream(
        self,
        mp: ManagedProcess,
        channel: OutputChannel,
        ctx: Any,
        response: Any,
        deadline: float | None,
        *,
        owns_lifetime: bool = False,
    ) -> AsyncIterator[Any]:
        """start, then output and keepalives, then the end. The Start stream whose deadline killed
        the process ends with DEADLINE_EXCEEDED (as envd's does), other streams see the kill."""
        keepalive = _keepalive_seconds(ctx.request_headers)
        try:
            yield response(
                event=pb.ProcessEvent(event=Oneof("start", pb.ProcessEvent.StartEvent(pid=mp.pid)))
            )
            while True:
                wait = keepalive
                if deadline is not None:
                    wait = min(wait, max(0.0, deadline - time.monotonic()))
                item = await channel.receive(wait)
                if item is _IDLE:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise ConnectError(Code.DEADLINE_EXCEEDED, "the process's time limit was reached")
                    yield response(
                        event=pb.ProcessEvent(event=Oneof("keepalive", pb.ProcessEvent.KeepAlive()))
                    )
                elif isinstance(item, _End):
                    if owns_lifetime and mp.lifetime_expired:
                        raise ConnectError(Code.DEADLINE_EXCEEDED, "the process's time limit was reached")
                    END_OF_STREAM_FOLLOWS.set(True)
                    yield response(event=_end_event(item.status))
                    return
                else:
                    yield response(event=_data_event(item))
        finally:
            mp.unsubscribe(channel)

    async def start(self, request: pb.StartRequest, ctx: Any) -> AsyncIterator[pb.StartResponse]:
        sandbox = self._sandbox(ctx)
        user = self._user(sandbox, ctx)
        config = request.process or pb.ProcessConfig()
        if not config.cmd:
            raise ConnectError(Code.INVALID_ARGUMENT, "process.cmd is required")
        cwd = resolve_cwd(_optional(config, "cwd"), user.home, sandbox.default_workdir)
        try:
            is_dir = stat.S_ISDIR(sandbox.root.stat(cwd).st_mode)
        except CorralError:
            is_dir = False
        if not is_dir:
            raise ConnectError(Code.INVALID_ARGUMENT, f"cwd '{cwd}' does not exist")
        env = {"PATH": PATH, "HOME": user.home, "USER": user.name, "LOGNAME": user.name}
        env.update(sandbox.default_env())
        pty = None
        if request.pty is not None:
            size = request.pty.size
            pty = (
                PtySize(cols=size.cols or 80, rows=size.rows or 24)
                if size is not None
                else PtySize(cols=80, rows=24)
            )
            env["TERM"] = "xterm-256color"
        env.update(config.envs)
        stdin = _optional(request, "stdin")
        timeout_ms = ctx.timeout_ms
        lifetime = timeout_ms / 1000.0 if timeout_ms is not None and timeout_ms > 0 else None
        deadline = time.monotonic() + lifetime if lifetime is not None else None
        tag = _optional(request, "tag")
        wall_deadline = None if lifetime is None else time.time() + lifetime
        try:
            proc = await sandbox.spawner.spawn(
                SpawnRequest(
                    argv=[config.cmd, *config.args],
                    env=env,
                    cwd=cwd,
                    user=user,
                    pty=pty,
                    stdin=pty is None and stdin is not False,
                    description=describe_process(config, tag, pty is not None, wall_deadline),
                )
            )
        except CorralError as exc:
            raise connect_error(exc) from None
        mp = ManagedProcess(proc, config, tag, pty is not None)
        channel = mp.subscribe()
        sandbox.processes.add(mp, None if deadline is None else max(0.0, deadline - time.monotonic()))
        async for message in self._stream(mp, channel, ctx, pb.StartResponse, deadline, owns_lifetime=True):
            yield message

    async def connect(self, request: pb.ConnectRequest, ctx: Any) -> AsyncIterator[pb.ConnectResponse]:
        mp = self._select(ctx, request.process, include_ended=True)
        channel = mp.subscribe()
        timeout_ms = ctx.timeout_ms
        deadline = (
            time.monotonic() + timeout_ms / 1000.0 if timeout_ms is not None and timeout_ms > 0 else None
        )
        async for message in self._stream(mp, channel, ctx, pb.ConnectResponse, deadline):
            yield message

    async def list(self, request: pb.ListRequest, ctx: Any) -> pb.ListResponse:
        sandbox = self._sandbox(ctx)
        return pb.ListResponse(
            processes=[
                pb.ProcessInfo(config=mp.config, pid=mp.pid, tag=mp.tag) for mp in sandbox.processes.running()
            ]
        )

    async def send_signal(self, request: pb.SendSignalRequest, ctx: Any) -> pb.SendSignalResponse:
        mp = self._select(ctx, request.process)
        signum = _SIGNALS.get(request.signal)  # type: ignore[call-overload]
        if signum is None:
            raise ConnectError(Code.UNIMPLEMENTED, f"invalid signal: {request.signal}")
        mp.send_signal(signum)
        return pb.SendSignalResponse()

    async def send_input(self, request: pb.SendInputRequest, ctx: Any) -> pb.SendInputResponse:
        mp = self._select(ctx, request.process)
        match request.input.input if request.input is not None else None:
            case Oneof(value=data) if data:
                await self._write(mp, data)
        return pb.SendInputResponse()

    async def _write(self, mp: ManagedProcess, data: bytes) -> None:
        try:
            await mp.proc.write_input(data)
        except InvalidArgument as exc:
            raise ConnectError(Code.FAILED_PRECONDITION, exc.message) from None
        except CorralError as exc:
            raise connect_error(exc) from None

    async def close_stdin(self, request: pb.CloseStdinRequest, ctx: Any) -> pb.CloseStdinResponse:
        mp = self._select(ctx, request.process)
        if mp.is_pty:
            raise connect_error(FailedPrecondition(f"process {mp.pid} has a terminal, not a stdin pipe"))
        mp.proc.close_stdin()
        return pb.CloseStdinResponse()

    async def update(self, request: pb.UpdateRequest, ctx: Any) -> pb.UpdateResponse:
        mp = self._select(ctx, request.process)
        if request.pty is not None and request.pty.size is not None:
            size = request.pty.size
            try:
                mp.proc.resize(PtySize(cols=size.cols, rows=size.rows))
            except InvalidArgument as exc:
                raise ConnectError(Code.FAILED_PRECONDITION, exc.message) from None
            except OSError as exc:
                raise ConnectError(Code.FAILED_PRECONDITION, f"cannot resize: {exc.strerror}") from None
        return pb.UpdateResponse()

    async def stream_input(
        self, request: AsyncIterator[pb.StreamInputRequest], ctx: Any
    ) -> pb.StreamInputResponse:
        """Client streaming: `start{process}` names the process, then `data{input}` messages feed it."""
        mp: ManagedProcess | None = None
        async for message in request:
            match message.event:
                case Oneof(field="start", value=start):
                    mp = self._select(ctx, start.process)
                case Oneof(field="data", value=data) if data.input is not None:
                    if mp is None:
                        raise ConnectError(
                            Code.FAILED_PRECONDITION, "the stream must start with a start event"
                        )
                    match data.input.input:
                        case Oneof(value=payload) if payload:
                            await self._write(mp, payload)
        return pb.StreamInputResponse()

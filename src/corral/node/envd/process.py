"""envd `process.Process`: processes started in a sandbox, their output fan-out, and the Connect service.

A `ManagedProcess` pumps the output of one process to its current subscribers (each a bounded
queue: a slow client slows the process down instead of growing server memory; with no subscriber
the output is dropped, the process keeps running). A client that goes away never kills a process;
only SendSignal, the process's lifetime limit (`connect-timeout-ms` on Start) or the sandbox's end do.
Ended processes stay connectable for `RETAIN_ENDED_S`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import signal
import stat
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from protobuf import Oneof

from corral.core.errors import CorralError, InvalidArgument, NotFound
from corral.core.sandbox import DEFAULT_USER
from corral.node.envd.context import EnvdSandbox
from corral.node.runtime._fdio import read_chunk
from corral.node.runtime.base import ExitStatus, PtySize, SpawnRequest, UserIds
from corral.spec._generated.process import process_connect
from corral.spec._generated.process import process_pb as pb

__all__ = ["ManagedProcess", "ProcessTable", "ProcessService", "SandboxGone", "connect_error", "acting_username"]

RETAIN_ENDED_S = 30.0
DEFAULT_KEEPALIVE_S = 90.0
_QUEUE_CHUNKS = 16  # per subscriber: at most 16 × 64 KiB in flight
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class SandboxGone(Exception):
    """The sandbox ended while a request was using it; its streams are cut at the transport level."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Data:
    stream: str  # stdout | stderr | pty
    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class _End:
    status: ExitStatus


_GONE = object()


class ManagedProcess:
    def __init__(self, proc: Any, config: pb.ProcessConfig, tag: str | None, pty: bool, stdin: bool) -> None:
        self.proc = proc
        self.pid: int = proc.pid
        self.config = config
        self.tag = tag
        self.is_pty = pty
        self.stdin_open = stdin or pty
        self.status: ExitStatus | None = None
        self.ended_at: float | None = None
        self._subscribers: set[asyncio.Queue[Any]] = set()
        self.done = asyncio.Event()

    def subscribe(self) -> asyncio.Queue[Any]:
        queue: asyncio.Queue[Any] = asyncio.Queue(_QUEUE_CHUNKS)
        if self.status is not None:
            queue.put_nowait(_End(self.status))
        else:
            self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Any]) -> None:
        self._subscribers.discard(queue)

    async def _publish(self, item: Any) -> None:
        for queue in list(self._subscribers):
            if queue in self._subscribers:
                await queue.put(item)

    async def pump(self) -> None:
        """Copy output to subscribers until EOF, then publish the end. Owned by the ProcessTable."""

        async def copy(stream: str, fd: int) -> None:
            while chunk := await read_chunk(fd):
                await self._publish(_Data(stream, chunk))

        try:
            async with asyncio.TaskGroup() as tg:
                for stream, fd in self.proc.output_fds():
                    tg.create_task(copy(stream, fd))
            self.status = await self.proc.wait()
        finally:
            self.proc.close()
            if self.status is None:
                self.status = ExitStatus(exit_code=-1, signal=signal.SIGKILL)
            self.ended_at = time.monotonic()
            for queue in list(self._subscribers):
                with contextlib.suppress(asyncio.QueueFull):
                    # An end must reach every subscriber, even a full one: make room by dropping output.
                    while queue.full():
                        queue.get_nowait()
                    queue.put_nowait(_End(self.status))
            self._subscribers.clear()
            self.done.set()

    def gone(self) -> None:
        """The sandbox is gone: wake every subscriber so its stream can be cut."""
        for queue in list(self._subscribers):
            while queue.full():
                queue.get_nowait()
            queue.put_nowait(_GONE)
        self._subscribers.clear()


class ProcessTable:
    """Processes started through envd in one sandbox. Owns their pump and lifetime tasks."""

    def __init__(self) -> None:
        self._by_pid: dict[int, ManagedProcess] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    def _own(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def add(self, mp: ManagedProcess, lifetime_s: float | None) -> None:
        self._prune()
        self._by_pid[mp.pid] = mp
        self._own(mp.pump())
        if lifetime_s is not None:
            self._own(self._limit_lifetime(mp, lifetime_s))

    async def _limit_lifetime(self, mp: ManagedProcess, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(mp.done.wait(), timeout=seconds)
            return
        mp.proc.send_signal(signal.SIGKILL)

    def _prune(self) -> None:
        now = time.monotonic()
        for pid, mp in list(self._by_pid.items()):
            if mp.ended_at is not None and now - mp.ended_at > RETAIN_ENDED_S:
                del self._by_pid[pid]

    def select(self, selector: pb.ProcessSelector | None) -> ManagedProcess:
        self._prune()
        match selector.selector if selector is not None else None:
            case Oneof(field="pid", value=pid):
                mp = self._by_pid.get(pid)
                if mp is not None:
                    return mp
                raise NotFound(f"process with pid {pid} not found")
            case Oneof(field="tag", value=tag):
                for mp in self._by_pid.values():
                    if mp.tag == tag and mp.status is None:
                        return mp
                raise NotFound(f"process with tag {tag} not found")
        raise InvalidArgument("process selector is required")

    def running(self) -> list[ManagedProcess]:
        return [mp for mp in self._by_pid.values() if mp.status is None]

    def close(self) -> None:
        """The sandbox is gone: cut every stream and stop pumping."""
        self.closed = True
        for mp in self._by_pid.values():
            mp.gone()
        for task in list(self._tasks):
            task.cancel()
        self._by_pid.clear()


def connect_error(exc: CorralError) -> ConnectError:
    """Our error → a Connect error with the same code (one mapping: the code names are shared)."""
    return ConnectError(Code[exc.code.upper()], exc.message)


def acting_username(headers: Mapping[str, str]) -> str:
    """`Authorization: Basic base64("<user>:")` selects the user; no header means the default user."""
    value = headers.get("authorization", "")
    if not value.lower().startswith("basic "):
        return DEFAULT_USER
    try:
        decoded = base64.b64decode(value[6:].strip()).decode()
    except ValueError:
        raise ConnectError(Code.UNAUTHENTICATED, "invalid authorization header") from None
    return decoded.split(":", 1)[0] or DEFAULT_USER


def _resolve_cwd(cwd: str | None, user: UserIds) -> str:
    if not cwd:
        return user.home
    if cwd == "~" or cwd.startswith("~/"):
        cwd = user.home + cwd[1:]
    if not cwd.startswith("/"):
        cwd = f"{user.home.rstrip('/')}/{cwd}"
    return cwd


def _keepalive_seconds(headers: Mapping[str, str]) -> float:
    try:
        return max(1.0, float(headers.get("keepalive-ping-interval", DEFAULT_KEEPALIVE_S)))
    except ValueError:
        return DEFAULT_KEEPALIVE_S


def _end_event(status: ExitStatus) -> pb.ProcessEvent:
    end = pb.ProcessEvent.EndEvent(exit_code=status.exit_code, exited=status.signal is None, status=status.status)
    if status.exit_code != 0 or status.signal is not None:
        end.error = status.status
    return pb.ProcessEvent(event=Oneof("end", end))


def _data_event(item: _Data) -> pb.ProcessEvent:
    return pb.ProcessEvent(event=Oneof("data", pb.ProcessEvent.DataEvent(output=Oneof(item.stream, item.data))))


class ProcessService(process_connect.Process):
    """The `process.Process` Connect service for every sandbox on this node.

    `lookup(headers)` returns the sandbox a request is for (the proxy sets `e2b-sandbox-id`).
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
            return self._lookup_user(sandbox.root, acting_username(ctx.request_headers))
        except CorralError as exc:
            raise connect_error(exc) from None

    async def _stream(
        self, sandbox: EnvdSandbox, mp: ManagedProcess, queue: asyncio.Queue[Any], ctx: Any, response: Any, deadline: float | None
    ) -> AsyncIterator[Any]:
        keepalive = _keepalive_seconds(ctx.request_headers)
        try:
            yield response(event=pb.ProcessEvent(event=Oneof("start", pb.ProcessEvent.StartEvent(pid=mp.pid))))
            while True:
                wait = keepalive
                if deadline is not None:
                    wait = min(wait, max(0.0, deadline - time.monotonic()))
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=wait)
                except TimeoutError:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise ConnectError(Code.DEADLINE_EXCEEDED, "process lifetime limit reached") from None
                    yield response(event=pb.ProcessEvent(event=Oneof("keepalive", pb.ProcessEvent.KeepAlive())))
                    continue
                if item is _GONE:
                    raise SandboxGone(sandbox.sandbox_id)
                if isinstance(item, _End):
                    yield response(event=_end_event(item.status))
                    return
                yield response(event=_data_event(item))
        finally:
            mp.unsubscribe(queue)

    async def start(self, request: pb.StartRequest, ctx: Any) -> AsyncIterator[pb.StartResponse]:
        sandbox = self._sandbox(ctx)
        user = self._user(sandbox, ctx)
        config = request.process or pb.ProcessConfig()
        if not config.cmd:
            raise ConnectError(Code.INVALID_ARGUMENT, "process.cmd is required")
        cwd = _resolve_cwd(config.cwd, user)
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
            pty = PtySize(cols=size.cols if size else 80, rows=size.rows if size else 24)
            env.setdefault("TERM", "xterm-256color")
        env.update(config.envs)
        stdin = bool(request.stdin) if request.stdin is not None else True
        timeout_ms = ctx.timeout_ms
        lifetime = timeout_ms / 1000.0 if timeout_ms is not None and timeout_ms > 0 else None
        try:
            proc = await sandbox.spawner.spawn(
                SpawnRequest(argv=[config.cmd, *config.args], env=env, cwd=cwd, user=user, pty=pty, stdin=stdin and pty is None)
            )
        except CorralError as exc:
            raise connect_error(exc) from None
        mp = ManagedProcess(proc, config, request.tag, pty is not None, stdin)
        queue = mp.subscribe()
        sandbox.processes.add(mp, lifetime)
        deadline = time.monotonic() + lifetime if lifetime is not None else None
        async for message in self._stream(sandbox, mp, queue, ctx, pb.StartResponse, deadline):
            yield message

    async def connect(self, request: pb.ConnectRequest, ctx: Any) -> AsyncIterator[pb.ConnectResponse]:
        sandbox = self._sandbox(ctx)
        try:
            mp = sandbox.processes.select(request.process)
        except CorralError as exc:
            raise connect_error(exc) from None
        queue = mp.subscribe()
        async for message in self._stream(sandbox, mp, queue, ctx, pb.ConnectResponse, None):
            yield message

    async def list(self, request: pb.ListRequest, ctx: Any) -> pb.ListResponse:
        sandbox = self._sandbox(ctx)
        return pb.ListResponse(
            processes=[pb.ProcessInfo(config=mp.config, pid=mp.pid, tag=mp.tag) for mp in sandbox.processes.running()]
        )

    def _select(self, ctx: Any, selector: pb.ProcessSelector | None) -> ManagedProcess:
        try:
            return self._sandbox(ctx).processes.select(selector)
        except CorralError as exc:
            raise connect_error(exc) from None

    async def send_signal(self, request: pb.SendSignalRequest, ctx: Any) -> pb.SendSignalResponse:
        mp = self._select(ctx, request.process)
        signum = {pb.Signal.SIGNAL_SIGKILL: signal.SIGKILL, pb.Signal.SIGNAL_SIGTERM: signal.SIGTERM}.get(request.signal)
        if signum is None:
            raise ConnectError(Code.UNIMPLEMENTED, f"invalid signal: {request.signal}")
        mp.proc.send_signal(signum)
        return pb.SendSignalResponse()

    async def send_input(self, request: pb.SendInputRequest, ctx: Any) -> pb.SendInputResponse:
        mp = self._select(ctx, request.process)
        match request.input.input if request.input is not None else None:
            case Oneof(field="stdin" | "pty", value=data):
                try:
                    mp.proc.write_stdin(data)
                except (CorralError, OSError) as exc:
                    raise ConnectError(Code.FAILED_PRECONDITION, f"cannot write input: {exc}") from None
        return pb.SendInputResponse()

    async def close_stdin(self, request: pb.CloseStdinRequest, ctx: Any) -> pb.CloseStdinResponse:
        mp = self._select(ctx, request.process)
        mp.proc.close_stdin()
        return pb.CloseStdinResponse()

    async def update(self, request: pb.UpdateRequest, ctx: Any) -> pb.UpdateResponse:
        mp = self._select(ctx, request.process)
        if request.pty is not None and request.pty.size is not None:
            try:
                mp.proc.resize(PtySize(cols=request.pty.size.cols, rows=request.pty.size.rows))
            except CorralError as exc:
                raise connect_error(exc) from None
        return pb.UpdateResponse()

    async def stream_input(self, request: AsyncIterator[pb.StreamInputRequest], ctx: Any) -> pb.StreamInputResponse:
        mp: ManagedProcess | None = None
        async for message in request:
            match message.event:
                case Oneof(field="start", value=start):
                    mp = self._select(ctx, start.process)
                case Oneof(field="data", value=data) if mp is not None and data.input is not None:
                    match data.input.input:
                        case Oneof(value=payload):
                            mp.proc.write_stdin(payload)
        return pb.StreamInputResponse()

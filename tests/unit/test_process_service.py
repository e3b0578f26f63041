"""The envd process service over the real `RuntimeSpawner`, driven by a fake OCI runtime.

The fake runtime takes crun's `exec` command line, forks the command into a new session (as crun
does), hands a pty master to `--console-socket` when asked, and exits with the command's status
(128+N for signal N). So this covers `ProcessService`, `ProcessTable`, the output pump and
`crun.RuntimeProcess` without root or a sandbox; tests/compat covers the real thing.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from protobuf import Oneof

from corral.core.errors import Unauthenticated
from corral.node.envd.confined import ConfinedRoot
from corral.node.envd.context import EnvdSandbox
from corral.node.envd.process import ProcessService, ProcessTable, SandboxGone
from corral.node.runtime.base import UserIds
from corral.node.runtime.crun import OciRuntime, RuntimeSpawner
from corral.spec._generated.process import process_pb as pb

FAKE_RUNTIME = r"""
import fcntl, json, os, pty, socket, struct, sys, termios

args, opts, positional = sys.argv[1:], {}, []
while args:
    if args[0].startswith("--"):
        opts[args[0]], args = args[1], args[2:]
    else:
        positional, args = positional + [args[0]], args[1:]
assert positional[0] == "exec", positional
with open(opts["--process"]) as f:
    process = json.load(f)
console = opts.get("--console-socket")
if console:
    master, slave = pty.openpty()
    size = process.get("consoleSize")
    if size:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size["height"], size["width"], 0, 0))
pid = os.fork()
if pid == 0:
    os.setsid()
    if console:
        os.close(master)
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        for fd in (0, 1, 2):
            os.dup2(slave, fd)
        os.close(slave)
    os.chdir(process["cwd"])
    os.execve(process["args"][0], process["args"], dict(e.split("=", 1) for e in process["env"]))
if console:
    os.close(slave)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(console)
        socket.send_fds(s, [b"t"], [master])
    os.close(master)
_, status = os.waitpid(pid, 0)
sys.exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
"""


class Ctx:
    def __init__(self, headers: dict[str, str] | None = None, timeout_ms: int | None = None) -> None:
        self.request_headers = headers or {}
        self.timeout_ms = timeout_ms


class Env:
    def __init__(self, tmp_path: Path) -> None:
        script = tmp_path / "fake-runtime"
        script.write_text(f"#!{sys.executable} -S\n{FAKE_RUNTIME}")
        script.chmod(0o755)
        bundle = tmp_path / "bundle"
        bundle.mkdir()
        self.home = tmp_path / "home"
        (self.home / "sub").mkdir(parents=True)
        self.user = UserIds(name="user", uid=os.getuid(), gid=os.getgid(), home=str(self.home))
        self.table = ProcessTable()
        self.sandbox = EnvdSandbox(
            sandbox_id="sbx",
            template_id="base",
            access_token=None,
            env_vars={"FROM_CREATE": "yes"},
            root=ConfinedRoot.open_path("/"),
            spawner=RuntimeSpawner(OciRuntime(str(script), tmp_path / "state"), "sbx", bundle, 1024),
            processes=self.table,
        )
        self.service = ProcessService(lambda headers: self.sandbox, self._lookup_user)

    def _lookup_user(self, root: Any, name: str) -> UserIds:
        if name != "user":
            raise Unauthenticated(f"invalid username: '{name}'")
        return self.user


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    env = Env(tmp_path)
    yield env
    for mp in env.table.running():
        mp.send_signal(signal.SIGKILL)
    env.table.close()
    env.sandbox.root.close()


def start_request(cmd: str, **kwargs: Any) -> pb.StartRequest:
    envs = kwargs.pop("envs", {})
    cwd = kwargs.pop("cwd", None)
    return pb.StartRequest(
        process=pb.ProcessConfig(cmd="/bin/sh", args=["-c", cmd], envs=envs, cwd=cwd),
        **{"stdin": False, **kwargs},
    )


def event(message: Any) -> tuple[Any, ...]:
    match message.event.event:
        case Oneof(field="start", value=start):
            return ("start", start.pid)
        case Oneof(field="data", value=data):
            return (data.output.field, data.output.value)
        case Oneof(field="end", value=end):
            return ("end", end.exit_code, end.status, end.error if end.has_field("error") else None)
        case Oneof(field="keepalive"):
            return ("keepalive",)
    raise AssertionError(message)


async def collect(stream: AsyncIterator[Any]) -> list[tuple[Any, ...]]:
    """Events with consecutive output of one stream joined (reads may split it anywhere)."""
    out: list[tuple[Any, ...]] = []
    async for message in stream:
        item = event(message)
        if out and item[0] in ("stdout", "stderr", "pty") and out[-1][0] == item[0]:
            out[-1] = (item[0], out[-1][1] + item[1])
        else:
            out.append(item)
    return out


async def next_event(stream: AsyncIterator[Any], timeout: float = 5) -> tuple[Any, ...]:
    """The next event (a timeout closes the stream, as a client going away would)."""
    return event(await asyncio.wait_for(anext(stream), timeout))


async def test_run_orders_start_output_end(env: Env) -> None:
    events = await collect(env.service.start(start_request("echo out; echo err >&2; exit 3"), Ctx()))
    assert events[0][0] == "start" and events[0][1] > 0
    assert sorted(events[1:-1]) == [("stderr", b"err\n"), ("stdout", b"out\n")]
    assert events[-1] == ("end", 3, "exit status 3", "exit status 3")


async def test_output_streams_before_the_process_ends(env: Env) -> None:
    stream = env.service.start(start_request("echo a; sleep 0.6; echo b"), Ctx())
    t0 = time.monotonic()
    assert (await next_event(stream))[0] == "start"
    assert await next_event(stream) == ("stdout", b"a\n")
    assert time.monotonic() - t0 < 0.5
    assert await collect(stream) == [("stdout", b"b\n"), ("end", 0, "exit status 0", None)]


async def test_bytes_arrive_exactly(env: Env) -> None:
    events = await collect(env.service.start(start_request(r"printf '\377\376\000ok\n'"), Ctx()))
    assert events[1] == ("stdout", b"\xff\xfe\x00ok\n")


async def test_env_cwd_and_user(env: Env) -> None:
    request = start_request("echo $FROM_CREATE ${A:-unset} $HOME $USER; pwd", envs={"A": "b"}, cwd="sub")
    events = await collect(env.service.start(request, Ctx()))
    assert events[1] == ("stdout", f"yes b {env.home} user\n{env.home}/sub\n".encode())
    events = await collect(env.service.start(start_request("echo ${A:-unset}; pwd", cwd="~"), Ctx()))
    assert events[1] == ("stdout", f"unset\n{env.home}\n".encode())
    with pytest.raises(ConnectError) as info:
        await anext(env.service.start(start_request("true", cwd="nope"), Ctx()))
    assert (info.value.code, info.value.message) == (
        Code.INVALID_ARGUMENT,
        f"cwd '{env.home}/nope' does not exist",
    )
    root = {"authorization": "Basic " + base64.b64encode(b"nobody:").decode()}
    with pytest.raises(ConnectError) as info:
        await anext(env.service.start(start_request("true"), Ctx(root)))
    assert (info.value.code, info.value.message) == (Code.UNAUTHENTICATED, "invalid username: 'nobody'")


async def test_kill_ends_the_whole_pipeline(env: Env) -> None:
    stream = env.service.start(start_request("sleep 100 | cat"), Ctx())
    _, pid = await next_event(stream)
    selector = pb.ProcessSelector(selector=Oneof("pid", pid))
    await env.service.send_signal(pb.SendSignalRequest(process=selector, signal=pb.Signal.SIGKILL), Ctx())
    assert await asyncio.wait_for(collect(stream), 5) == [("end", -1, "signal: killed", "signal: killed")]
    with pytest.raises(ConnectError) as info:  # no longer running
        await env.service.send_signal(pb.SendSignalRequest(process=selector, signal=pb.Signal.SIGKILL), Ctx())
    assert info.value.code == Code.NOT_FOUND


async def test_kill_does_not_wait_for_children_holding_the_pipes(env: Env) -> None:
    stream = env.service.start(start_request("sleep 3 & echo started"), Ctx())
    _, pid = await next_event(stream)
    assert await next_event(stream) == ("stdout", b"started\n")
    await asyncio.sleep(0.3)
    assert [mp.pid for mp in env.table.running()] == [pid]  # the shell has exited; `sleep` keeps stdout open
    selector = pb.ProcessSelector(selector=Oneof("pid", pid))
    await env.service.send_signal(pb.SendSignalRequest(process=selector, signal=pb.Signal.SIGKILL), Ctx())
    assert await asyncio.wait_for(collect(stream), 2) == [("end", 0, "exit status 0", None)]


async def test_invalid_signal(env: Env) -> None:
    stream = env.service.start(start_request("sleep 5"), Ctx())
    _, pid = await next_event(stream)
    selector = pb.ProcessSelector(selector=Oneof("pid", pid))
    with pytest.raises(ConnectError) as info:
        await env.service.send_signal(
            pb.SendSignalRequest(process=selector, signal=pb.Signal.UNSPECIFIED), Ctx()
        )
    assert info.value.code == Code.UNIMPLEMENTED


async def test_stdin_then_close(env: Env) -> None:
    stream = env.service.start(start_request("cat", stdin=True), Ctx())
    _, pid = await next_event(stream)
    selector = pb.ProcessSelector(selector=Oneof("pid", pid))
    data = pb.ProcessInput(input=Oneof("stdin", b"hello\n"))
    await env.service.send_input(pb.SendInputRequest(process=selector, input=data), Ctx())
    assert await next_event(stream) == ("stdout", b"hello\n")
    await env.service.close_stdin(pb.CloseStdinRequest(process=selector), Ctx())
    assert await collect(stream) == [("end", 0, "exit status 0", None)]


async def test_stdin_off_means_eof(env: Env) -> None:
    events = await collect(env.service.start(start_request("cat; echo done"), Ctx()))
    assert events[1:] == [("stdout", b"done\n"), ("end", 0, "exit status 0", None)]


async def test_connect_list_and_retained_end(env: Env) -> None:
    stream = env.service.start(start_request("echo a; sleep 0.5; echo b", tag="job"), Ctx())
    _, pid = await next_event(stream)
    listed = (await env.service.list(pb.ListRequest(), Ctx())).processes
    assert [(p.pid, p.tag, list(p.config.args)) for p in listed] == [
        (pid, "job", ["-c", "echo a; sleep 0.5; echo b"])
    ]
    assert await next_event(stream) == ("stdout", b"a\n")
    await stream.aclose()  # the first client goes away: the process keeps running
    by_tag = pb.ConnectRequest(process=pb.ProcessSelector(selector=Oneof("tag", "job")))
    events = await collect(env.service.connect(by_tag, Ctx()))
    assert events == [("start", pid), ("stdout", b"b\n"), ("end", 0, "exit status 0", None)]
    by_pid = pb.ConnectRequest(process=pb.ProcessSelector(selector=Oneof("pid", pid)))
    assert await collect(env.service.connect(by_pid, Ctx())) == [
        ("start", pid),
        ("end", 0, "exit status 0", None),
    ]
    assert (await env.service.list(pb.ListRequest(), Ctx())).processes == []
    unknown = pb.ConnectRequest(process=pb.ProcessSelector(selector=Oneof("pid", 999999)))
    with pytest.raises(ConnectError) as info:
        await anext(env.service.connect(unknown, Ctx()))
    assert (info.value.code, info.value.message) == (Code.NOT_FOUND, "process with pid 999999 not found")


async def test_lifetime_limit_kills_after_the_client_left(env: Env) -> None:
    stream = env.service.start(start_request("sleep 30"), Ctx(timeout_ms=400))
    _, pid = await next_event(stream)
    await stream.aclose()
    by_pid = pb.ConnectRequest(process=pb.ProcessSelector(selector=Oneof("pid", pid)))
    events = await asyncio.wait_for(collect(env.service.connect(by_pid, Ctx())), 5)
    assert events == [("start", pid), ("end", -1, "signal: killed", "signal: killed")]


async def test_start_stream_ends_with_deadline_exceeded(env: Env) -> None:
    stream = env.service.start(start_request("sleep 30"), Ctx(timeout_ms=300))
    with pytest.raises(ConnectError) as info:
        await asyncio.wait_for(collect(stream), 5)
    assert info.value.code == Code.DEADLINE_EXCEEDED


async def test_keepalive_on_an_idle_stream(env: Env) -> None:
    events = await collect(
        env.service.start(start_request("sleep 1.4"), Ctx({"keepalive-ping-interval": "1"}))
    )
    assert [e[0] for e in events] == ["start", "keepalive", "end"]


async def test_back_pressure_bounds_memory_and_keeps_every_byte(env: Env) -> None:
    size = 16 * 1024 * 1024
    stream = env.service.start(start_request(f"head -c {size} /dev/zero; echo done >&2"), Ctx())
    await next_event(stream)
    await asyncio.sleep(0.3)  # nobody reads: the process must block on its full pipe
    (mp,) = env.table.running()
    queued = sum(len(item.data) for channel in mp._subscribers for item in channel._items)
    assert queued <= 16 * 65536
    total = 0
    async for message in stream:
        match event(message):
            case ("stdout", data):
                total += len(data)
            case ("end", code, *_):
                assert code == 0
    assert total == size


async def test_pty_size_resize_and_exit(env: Env) -> None:
    request = pb.StartRequest(
        process=pb.ProcessConfig(cmd="/bin/sh", envs={"PS1": "$ "}),
        pty=pb.PTY(size=pb.PTY.Size(cols=80, rows=24)),
    )
    stream = env.service.start(request, Ctx())
    _, pid = await next_event(stream)
    selector = pb.ProcessSelector(selector=Oneof("pid", pid))

    async def type_and_read(line: bytes, expect: bytes) -> None:
        await env.service.send_input(
            pb.SendInputRequest(process=selector, input=pb.ProcessInput(input=Oneof("pty", line))), Ctx()
        )
        seen = b""
        while expect not in seen:
            kind, data = await next_event(stream)
            assert kind == "pty"
            seen += data

    await type_and_read(b"echo $TERM; stty size\n", b"xterm-256color\r\n24 80\r\n")
    await env.service.update(
        pb.UpdateRequest(process=selector, pty=pb.PTY(size=pb.PTY.Size(cols=100, rows=30))), Ctx()
    )
    await type_and_read(b"stty size\n", b"30 100\r\n")
    await env.service.send_input(
        pb.SendInputRequest(process=selector, input=pb.ProcessInput(input=Oneof("pty", b"exit 0\n"))), Ctx()
    )
    events = await collect(stream)
    assert events[-1] == ("end", 0, "exit status 0", None)
    with pytest.raises(ConnectError) as info:
        await env.service.close_stdin(pb.CloseStdinRequest(process=selector), Ctx())
    assert info.value.code == Code.NOT_FOUND


async def test_stream_input(env: Env) -> None:
    stream = env.service.start(start_request("head -n 2", stdin=True), Ctx())
    _, pid = await next_event(stream)

    async def inputs() -> AsyncIterator[pb.StreamInputRequest]:
        yield pb.StreamInputRequest(
            event=Oneof(
                "start",
                pb.StreamInputRequest.StartEvent(process=pb.ProcessSelector(selector=Oneof("pid", pid))),
            )
        )
        for line in (b"one\n", b"two\n"):
            yield pb.StreamInputRequest(
                event=Oneof(
                    "data", pb.StreamInputRequest.DataEvent(input=pb.ProcessInput(input=Oneof("stdin", line)))
                )
            )

    await env.service.stream_input(inputs(), Ctx())
    assert await collect(stream) == [("stdout", b"one\ntwo\n"), ("end", 0, "exit status 0", None)]


async def test_sandbox_gone_cuts_streams(env: Env) -> None:
    stream = env.service.start(start_request("sleep 5"), Ctx())
    await next_event(stream)
    (mp,) = env.table.running()
    env.table.close()
    with pytest.raises(SandboxGone):
        await next_event(stream)
    mp.send_signal(signal.SIGKILL)
    await asyncio.wait_for(mp.done.wait(), 5)  # the pump still reaps the runtime process


async def test_connect_sees_the_kill_of_a_lifetime_limit(env: Env) -> None:
    stream = env.service.start(start_request("sleep 30"), Ctx(timeout_ms=500))
    _, pid = await next_event(stream)
    by_pid = pb.ConnectRequest(process=pb.ProcessSelector(selector=Oneof("pid", pid)))
    events = await asyncio.wait_for(collect(env.service.connect(by_pid, Ctx(timeout_ms=60_000))), 5)
    assert events == [("start", pid), ("end", -1, "signal: killed", "signal: killed")]
    with pytest.raises(ConnectError) as info:
        await collect(stream)
    assert info.value.code == Code.DEADLINE_EXCEEDED

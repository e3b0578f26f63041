"""The exec agent's host side (corral.node.runtime.agent): the wire format, a hostile fake agent
that must not crash or hang the host, and the real agent binary (native/corral-init.c, built
here) run on the host as an ordinary process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.core.errors import Internal, InvalidArgument
from corral.node.runtime.agent import (
    MAX_DESCRIPTION,
    AdoptEnd,
    AgentConnection,
    AgentProcess,
    AgentProtocolError,
    AgentSpawner,
    Exited,
    Failed,
    Hello,
    Kept,
    Spawned,
    encode_adopt,
    encode_close_stdin,
    encode_signal,
    encode_spawn,
    exit_status,
    listen_agent_socket,
    parse_message,
)
from corral.node.runtime.base import ExitStatus, PtySize, SpawnRequest, UserIds

ROOT = UserIds("root", 0, 0, "/root")
SOURCE = Path(__file__).resolve().parents[2] / "native" / "corral-init.c"


def request(*argv: str, **kwargs: object) -> SpawnRequest:
    kwargs.setdefault("env", {"PATH": "/usr/bin:/bin"})
    kwargs.setdefault("cwd", "/")
    kwargs.setdefault("user", ROOT)
    return SpawnRequest(argv=argv, **kwargs)  # type: ignore[arg-type]


def record(kind: int, ident: int, *values: int) -> bytes:
    return struct.pack(f"=II{len(values)}I", kind, ident, *values)


# -- the wire format -------------------------------------------------------------------------------


def test_parse_accepts_exactly_the_four_answers() -> None:
    assert parse_message(record(16, 0, 1, 1 << 20)) == Hello(1, 1 << 20)
    assert parse_message(record(17, 5, 42)) == Spawned(5, 42)
    assert parse_message(record(18, 5, 11, 2)) == Failed(5, "exec", 2)
    assert parse_message(record(19, 0, 42, 3 << 8)) == Exited(42, ExitStatus(3))
    assert parse_message(record(19, 0, 42, 9)) == Exited(42, ExitStatus(-1, signal=9))
    assert parse_message(record(19, 0, 42, 0x80 | 11)) == Exited(42, ExitStatus(-1, signal=11))  # core dumped


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x10\0\0",
        record(16, 0, 1),  # HELLO too short
        record(17, 1, 42, 0),  # SPAWNED too long
        record(1, 1, 0, 0),  # a request type, not an answer
        record(99, 0, 0, 0),
        record(17, 1, 0),  # pid 0
        record(17, 1, 1),  # pid 1 is the agent itself
        record(17, 1, 1 << 31),
        record(18, 1, 99, 2),  # unknown stage
        record(18, 1, 11, 0),  # errno 0
        record(18, 1, 11, 1 << 20),
        record(19, 0, 42, 0x137F),  # stopped, not exited
        record(19, 0, 42, 0xFFFF),  # continued
        record(19, 0, 42, 1 << 16),
        record(19, 0, 42, 0x7F),
    ],
)
def test_parse_refuses_garbage(data: bytes) -> None:
    with pytest.raises(AgentProtocolError):
        parse_message(data)


def test_parse_refuses_truncated_records() -> None:
    with pytest.raises(AgentProtocolError):
        parse_message(record(19, 0, 42, 0), socket.MSG_TRUNC)


def test_parse_never_raises_anything_else_on_random_bytes() -> None:
    rng = random.Random(7)
    for _ in range(20000):
        data = bytes(rng.randrange(256) for _ in range(rng.choice((8, 12, 16, rng.randrange(40)))))
        if rng.random() < 0.5 and len(data) >= 4:
            data = struct.pack("=I", rng.choice((16, 17, 18, 19))) + data[4:]
        try:
            parse_message(data)
        except AgentProtocolError:
            pass


def test_exit_status_is_go_like() -> None:
    assert exit_status(0) == ExitStatus(0)
    assert exit_status(255 << 8).status == "exit status 255"
    assert exit_status(signal.SIGKILL).status == "signal: killed"


def test_encode_spawn_layout() -> None:
    user = UserIds("user", 1000, 1000, "/home/user", groups=(27, 1000))
    pty = request(
        "/bin/echo", "a b", env={"A": "1"}, cwd="/tmp", user=user, pty=PtySize(80, 24), description=b"D"
    )
    data = encode_spawn(9, pty)
    fixed = struct.unpack_from("=IIIIIIIIIHH", data)
    assert fixed == (1, 9, 1000, 1000, 1 | 2, 2, 2, 1, 1, 80, 24)  # F_PTY | F_KEEP, desclen 1
    assert struct.unpack_from("=2I", data, 40) == (27, 1000)
    assert data[48:] == b"D/tmp\0/bin/echo\0a b\0A=1\0"
    piped = struct.unpack_from("=IIIIIIIIIHH", encode_spawn(9, request("/bin/cat", stdin=True)))
    assert piped[4] == 2 | 4  # F_KEEP | F_STDIN: the host's stdin end goes along
    # An agent of protocol 1 (booted before processes were kept) gets the old layout, no description.
    old = encode_spawn(9, pty, version=1)
    assert struct.unpack_from("=IIIIIIIIHH", old) == (1, 9, 1000, 1000, 1, 2, 2, 1, 80, 24)
    assert old[44:] == b"/tmp\0/bin/echo\0a b\0A=1\0"
    assert struct.unpack("=IIII", encode_signal(42, 15)) == (2, 0, 42, 15)
    assert struct.unpack("=II", encode_adopt(5)) == (3, 5)
    assert struct.unpack("=III", encode_close_stdin(42)) == (4, 0, 42)
    with pytest.raises(InvalidArgument, match="description too large"):
        encode_spawn(1, request("/bin/true", description=b"x" * (MAX_DESCRIPTION + 1)))


def process_record(ident: int, pid: int, flags: int, status: int = 0, description: bytes = b"") -> bytes:
    return struct.pack("=IIIIII", 20, ident, pid, flags, status, len(description)) + description


def test_parse_process_records() -> None:
    assert parse_message(process_record(3, 42, 4, 0, b"{}")) == Kept(3, 42, False, True, None, b"{}")
    assert parse_message(process_record(3, 42, 1 | 2, 7 << 8)) == Kept(3, 42, True, False, ExitStatus(7), b"")
    assert parse_message(record(21, 3, 2, 0)) == AdoptEnd(3, 2)
    for bad in (
        process_record(3, 42, 0)[:-1],  # short
        process_record(3, 42, 0, 0, b"abc")[:-1],  # description shorter than said
        process_record(3, 42, 0, 0, b"x" * (MAX_DESCRIPTION + 1)),
        process_record(3, 1, 0),  # pid 1
        process_record(3, 42, 8),  # unknown flag
        process_record(3, 42, 1 | 4),  # a pty with a stdin pipe
        process_record(3, 42, 0, 3 << 8),  # a status without P_EXITED
        process_record(3, 42, 2, 0x137F),  # exited, but the status says stopped
    ):
        with pytest.raises(AgentProtocolError):
            parse_message(bad)


@pytest.mark.parametrize(
    "bad",
    [
        request("/bin/echo", "a\0b"),
        request("/bin/echo", env={"A": "x\0y"}),
        request("/bin/echo", cwd="/t\0mp"),
        request(),
        request("/bin/echo", user=UserIds("many", 1, 1, "/", groups=tuple(range(2000)))),
        request("/bin/echo", user=UserIds("neg", -1, 1, "/")),
    ],
)
def test_encode_spawn_refuses_what_the_kernel_could_not_take(bad: SpawnRequest) -> None:
    with pytest.raises(InvalidArgument):
        encode_spawn(1, bad)


def test_listen_socket_is_owner_only_and_replaces_a_stale_one(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    path.write_text("stale")
    with listen_agent_socket(path):
        assert oct(path.stat().st_mode & 0o7777) == "0o600"
    deep = tmp_path / ("d" * 120)  # longer than sockaddr_un takes: bound through /proc/self/fd
    deep.mkdir()
    with listen_agent_socket(deep / "agent.sock") as sock:
        assert sock.getsockname().endswith("/agent.sock") and (deep / "agent.sock").is_socket()


# -- a hostile fake agent ------------------------------------------------------------------------------


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


class FakeAgent:
    """The agent's end of a socketpair, driven by the test."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, data: bytes, fds: list[int] | None = None) -> None:
        socket.send_fds(self.sock, [data], fds or [])

    async def receive(self) -> tuple[bytes, list[int]]:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, 1 << 16, 8)
                return data, fds
            except BlockingIOError:
                ready = loop.create_future()
                loop.add_reader(self.sock.fileno(), ready.set_result, None)
                try:
                    await ready
                finally:
                    loop.remove_reader(self.sock.fileno())


@pytest.fixture
async def pair() -> AsyncIterator[tuple[AgentConnection, FakeAgent]]:
    host, agent = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    host.setblocking(False)
    agent.setblocking(False)
    connection = AgentConnection(host, "fake")
    fake = FakeAgent(agent)
    fake.send(record(16, 0, 1, 1 << 20))
    await asyncio.wait_for(asyncio.shield(connection.hello), 5)
    yield connection, fake
    connection.close()
    agent.close()


async def spawn_and_answer(connection: AgentConnection, fake: FakeAgent, req: SpawnRequest, answer: bytes,
                           fds: list[int] | None = None) -> object:  # fmt: skip
    spawning = asyncio.ensure_future(connection.spawn(req))
    data, passed = await asyncio.wait_for(fake.receive(), 5)
    for fd in passed:
        os.close(fd)
    request_id = struct.unpack_from("=II", data)[1]
    fake.send(answer.replace(b"\xee\xee\xee\xee", struct.pack("=I", request_id)), fds)
    return await asyncio.wait_for(spawning, 5)


async def test_fake_agent_well_behaved(pair: tuple[AgentConnection, FakeAgent]) -> None:
    connection, fake = pair
    proc = await spawn_and_answer(
        connection, fake, request("/bin/true"), b"\x11\0\0\0\xee\xee\xee\xee" + struct.pack("=I", 42)
    )
    assert proc.pid == 42  # type: ignore[attr-defined]
    fake.send(record(19, 0, 42, 3 << 8))
    assert await asyncio.wait_for(proc.wait(), 5) == ExitStatus(3)  # type: ignore[attr-defined]
    proc.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "kind",
    [
        "fd_with_pipes",
        "file_as_pty_master",
        "unknown_request",
        "garbage",
        "exit_of_unknown_pid",
        "second_hello",
        "duplicate_pid",
    ],
)
async def test_fake_agent_misbehaving_drops_the_connection(
    pair: tuple[AgentConnection, FakeAgent], kind: str
) -> None:
    connection, fake = pair
    before = open_fds()
    running = await spawn_and_answer(
        connection, fake, request("/bin/sleep", "9"), b"\x11\0\0\0\xee\xee\xee\xee" + struct.pack("=I", 50)
    )
    spawned = b"\x11\0\0\0\xee\xee\xee\xee" + struct.pack("=I", 51)
    with tempfile.TemporaryFile() as file:
        if kind == "fd_with_pipes":
            outcome = spawn_and_answer(connection, fake, request("/bin/true"), spawned, [file.fileno()])
        elif kind == "file_as_pty_master":
            outcome = spawn_and_answer(
                connection, fake, request("/bin/sh", pty=PtySize(80, 24)), spawned, [file.fileno()]
            )
        elif kind == "duplicate_pid":
            outcome = spawn_and_answer(
                connection, fake, request("/bin/true"), spawned[:-4] + struct.pack("=I", 50)
            )
        else:
            fake.send({
                "unknown_request": record(17, 777, 60),
                "garbage": os.urandom(13),
                "exit_of_unknown_pid": record(19, 0, 4242, 0),
                "second_hello": record(16, 0, 1, 1),
            }[kind])  # fmt: skip
            outcome = connection.spawn(request("/bin/true"))
        with pytest.raises(Internal, match="could not start process"):
            await asyncio.wait_for(outcome, 5)
    # The process we had ends as killed (its sandbox is as good as gone), and nothing leaks.
    assert await asyncio.wait_for(running.wait(), 5) == ExitStatus(-1, signal=signal.SIGKILL)  # type: ignore[attr-defined]
    running.close()  # type: ignore[attr-defined]
    assert connection.closed
    assert open_fds() - before <= {str(fake.sock.fileno())}


async def test_fake_agent_flood_of_random_records(pair: tuple[AgentConnection, FakeAgent]) -> None:
    connection, fake = pair
    rng = random.Random(3)
    for _ in range(200):
        with contextlib.suppress(OSError):
            fake.send(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 24))))
    for _ in range(50):
        await asyncio.sleep(0.01)
        if connection.closed:
            break
    assert connection.closed


async def test_fake_agent_going_away_ends_waits_and_spawns(pair: tuple[AgentConnection, FakeAgent]) -> None:
    connection, fake = pair
    proc = await spawn_and_answer(
        connection, fake, request("/bin/sleep", "9"), b"\x11\0\0\0\xee\xee\xee\xee" + struct.pack("=I", 70)
    )
    pending = asyncio.ensure_future(connection.spawn(request("/bin/true")))
    await asyncio.wait_for(fake.receive(), 5)
    fake.sock.close()
    assert await asyncio.wait_for(proc.wait(), 5) == ExitStatus(-1, signal=signal.SIGKILL)  # type: ignore[attr-defined]
    with pytest.raises(Internal):
        await asyncio.wait_for(pending, 5)
    proc.close()  # type: ignore[attr-defined]


async def test_fake_agent_that_never_answers(
    pair: tuple[AgentConnection, FakeAgent], monkeypatch: pytest.MonkeyPatch
) -> None:
    connection, fake = pair
    monkeypatch.setattr("corral.node.runtime.agent._START_TIMEOUT_S", 0.2)
    before = open_fds()
    with pytest.raises(Internal, match="did not answer"):
        await connection.spawn(request("/bin/true"))
    _, passed = await fake.receive()
    for fd in passed:
        os.close(fd)
    assert open_fds() <= before
    fake.send(record(17, 1, 77))  # a late answer: the process is killed, nothing is kept
    data, _ = await asyncio.wait_for(fake.receive(), 5)
    assert struct.unpack("=IIII", data) == (2, 0, 77, signal.SIGKILL)
    assert not connection.closed


@pytest.fixture
async def pair2() -> AsyncIterator[tuple[AgentConnection, FakeAgent]]:
    """A connection to a fake agent of protocol 2 (it keeps processes)."""
    host, agent = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    host.setblocking(False)
    agent.setblocking(False)
    connection = AgentConnection(host, "fake")
    fake = FakeAgent(agent)
    fake.send(record(16, 0, 2, 1 << 20))
    await asyncio.wait_for(asyncio.shield(connection.hello), 5)
    yield connection, fake
    connection.close()
    agent.close()


async def adopt_and_answer(
    connection: AgentConnection, fake: FakeAgent, answers: list[tuple[Any, list[int]]]
) -> list[AgentProcess]:
    """ADOPT, answered by `answers`: (a function of the request id that makes the record, fds)."""
    adopting = asyncio.ensure_future(connection.adopt())
    data, _ = await asyncio.wait_for(fake.receive(), 5)
    kind, ident = struct.unpack("=II", data)
    assert kind == 3
    for make, fds in answers:
        fake.send(make(ident), fds)
    return await asyncio.wait_for(adopting, 5)


async def test_fake_agent_hands_over_processes(pair2: tuple[AgentConnection, FakeAgent]) -> None:
    connection, fake = pair2
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r, in_w = os.pipe()
    done_r, done_w = os.pipe()
    try:
        procs = await adopt_and_answer(connection, fake, [
            (lambda i: process_record(i, 42, 4, 0, b"running"), [out_r, err_r, in_w]),
            (lambda i: process_record(i, 43, 2, 9, b"killed"), [done_r, done_r]),
            (lambda i: record(21, i, 2, 0), []),
        ])  # fmt: skip
        running, exited = procs
        assert (running.pid, running.description, running.kept) == (42, b"running", True)
        assert (exited.pid, exited.description) == (43, b"killed")
        assert await asyncio.wait_for(exited.wait(), 5) == ExitStatus(-1, signal=signal.SIGKILL)
        os.write(out_w, b"out")
        os.write(err_w, b"err")
        os.close(out_w)
        os.close(err_w)
        await running.write_input(b"in")
        assert os.read(in_r, 10) == b"in"
        running.close_stdin()  # the agent must drop its copy too
        data, _ = await asyncio.wait_for(fake.receive(), 5)
        assert struct.unpack("=III", data) == (4, 0, 42)
        assert await asyncio.wait_for(collect(running), 5) == {"stdout": b"out", "stderr": b"err"}
        fake.send(record(19, 0, 42, 3 << 8))  # its exit now comes to this connection
        assert await asyncio.wait_for(running.wait(), 5) == ExitStatus(3)
        assert not connection.closed
    finally:
        for proc in locals().get("procs", []):
            proc.close()
        for fd in (out_r, err_r, in_r, in_w, done_r, done_w):
            with contextlib.suppress(OSError):
                os.close(fd)


@pytest.mark.parametrize(
    "kind",
    [
        "file_as_pipe",
        "wrong_direction",
        "missing_fd",
        "pipe_as_pty",
        "wrong_count",
        "unknown_request",
        "duplicate_pid",
        "too_many",
    ],
)
async def test_fake_agent_handing_over_badly_drops_the_connection(
    pair2: tuple[AgentConnection, FakeAgent], kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    connection, fake = pair2
    monkeypatch.setattr("corral.node.runtime.agent._MAX_KEPT", 2)
    before = open_fds()
    r, w = os.pipe()
    with tempfile.TemporaryFile() as file:
        answers: list[tuple[Any, list[int]]] = {
            "file_as_pipe": [(lambda i: process_record(i, 42, 0), [file.fileno(), r])],
            "wrong_direction": [(lambda i: process_record(i, 42, 0), [r, w])],
            "missing_fd": [(lambda i: process_record(i, 42, 4), [r, r])],
            "pipe_as_pty": [(lambda i: process_record(i, 42, 1), [r])],
            "wrong_count": [
                (lambda i: process_record(i, 42, 0), [r, r]),
                (lambda i: record(21, i, 5, 0), []),
            ],
            "unknown_request": [(lambda i: process_record(i + 1, 42, 0), [r, r])],
            "duplicate_pid": [(lambda i: process_record(i, 42, 0), [r, r])] * 2,
            "too_many": [(lambda i, pid=pid: process_record(i, pid, 0), [r, r]) for pid in (42, 43, 44)],
        }[kind]
        with pytest.raises(Internal, match="could not take over processes"):
            await adopt_and_answer(connection, fake, answers)
    os.close(r)
    os.close(w)
    assert connection.closed
    assert open_fds() - before <= {str(fake.sock.fileno())}


# -- the real agent, run on the host (not as PID 1) ----------------------------------------------------


@pytest.fixture(scope="module")
def agent_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build native/corral-init.c (scripts/bootstrap.sh installs it)")
    binary = tmp_path_factory.mktemp("agent") / "corral-init"
    subprocess.run(
        ["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(binary), str(SOURCE)], check=True
    )
    return binary


@pytest.fixture
def agent_socket(agent_binary: Path, tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("the agent changes users: needs root")
    path = tmp_path / "agent.sock"
    listener = listen_agent_socket(path)
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, listener.fileno(), 3),
    ]
    pid = os.posix_spawn(str(agent_binary), [str(agent_binary)], {}, file_actions=actions)
    listener.close()
    try:
        yield path
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


async def collect(proc: object) -> dict[str, bytes]:
    from corral.node.runtime._fdio import read_chunk

    out: dict[str, bytes] = {}
    for name, fd in proc.output_fds():  # type: ignore[attr-defined]
        data = b""
        while chunk := await read_chunk(fd):
            data += chunk
        out[name] = data
    return out


async def test_real_agent_runs_commands(agent_socket: Path) -> None:
    spawner = AgentSpawner(agent_socket, "host")
    try:
        proc = await spawner.spawn(request("/bin/sh", "-c", "echo out; echo err >&2; id -u; pwd; exit 3", cwd="/tmp",
                                           user=UserIds("nobody", 65534, 65534, "/")))  # fmt: skip
        assert await asyncio.wait_for(collect(proc), 10) == {
            "stdout": b"out\n65534\n/tmp\n",
            "stderr": b"err\n",
        }
        assert await asyncio.wait_for(proc.wait(), 10) == ExitStatus(3)
        proc.close()

        cat = await spawner.spawn(request("/bin/cat", stdin=True))
        await cat.write_input(b"typed")
        cat.close_stdin()
        assert (await asyncio.wait_for(collect(cat), 10))["stdout"] == b"typed"
        assert await cat.wait() == ExitStatus(0)
        cat.close()

        group = await spawner.spawn(request("/bin/sh", "-c", "sleep 30 & sleep 30; wait"))
        await asyncio.sleep(0.2)
        group.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(group.wait(), 10) == ExitStatus(-1, signal=signal.SIGTERM)
        assert await asyncio.wait_for(collect(group), 10) == {
            "stdout": b"",
            "stderr": b"",
        }  # the group's sleeps ended
        group.close()

        tty = await spawner.spawn(request("/bin/sh", "-c", "tty; stty size", pty=PtySize(cols=91, rows=17)))
        text = (await asyncio.wait_for(collect(tty), 10))["pty"].decode()
        assert "/dev/pts/" in text and "17 91" in text, text
        tty.close()

        with pytest.raises(Internal, match="could not start process '/no/such': No such file or directory"):
            await spawner.spawn(request("/no/such"))
        with pytest.raises(InvalidArgument, match="cwd '/no/dir' does not exist"):
            await spawner.spawn(request("/bin/true", cwd="/no/dir"))
        with pytest.raises(InvalidArgument, match="too large"):
            await spawner.spawn(request("/bin/true", env={"BIG": "x" * (1 << 20)}))

        many = await asyncio.gather(*(spawner.spawn(request("/bin/echo", str(i))) for i in range(40)))
        outputs = await asyncio.gather(*(collect(p) for p in many))
        assert [o["stdout"] for o in outputs] == [f"{i}\n".encode() for i in range(40)]
        assert {await p.wait() for p in many} == {ExitStatus(0)}
        for p in many:
            p.close()
    finally:
        spawner.close()


async def test_real_agent_survives_garbage_and_serves_the_next_connection(agent_socket: Path) -> None:
    rng = random.Random(11)
    for _ in range(30):
        junk = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        junk.connect(str(agent_socket))
        junk.recv(64)  # HELLO
        payload = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
        if rng.random() < 0.5:  # a SPAWN header over random fields and strings
            payload = struct.pack("=II", 1, 1) + payload
        with contextlib.suppress(OSError):
            junk.send(payload)
        junk.close()
    spawner = AgentSpawner(agent_socket, "host")
    try:
        proc = await spawner.spawn(request("/bin/echo", "alive"))
        assert (await asyncio.wait_for(collect(proc), 10))["stdout"] == b"alive\n"
        assert await proc.wait() == ExitStatus(0)
        proc.close()
    finally:
        spawner.close()


async def test_real_agent_keeps_processes_for_the_next_server(agent_socket: Path) -> None:
    """A server that goes away leaves its processes to the agent: one that writes 3 MB meanwhile
    blocks (no EPIPE) and goes on, one that exits is remembered, a pty shell gets no hangup, a
    stdin pipe stays open; the next connection gets them all, with their descriptions."""
    first = AgentSpawner(agent_socket, "host")
    script = "sleep 0.5; head -c 3000000 /dev/zero; echo; echo end; exit 5"
    writer = await first.spawn(request("/bin/sh", "-c", script, description=b"writer"))
    quitter = await first.spawn(
        request("/bin/sh", "-c", "sleep 0.3; echo bye; exit 7", description=b"quitter")
    )
    shell = await first.spawn(request("/bin/sh", pty=PtySize(cols=80, rows=24), description=b"shell"))
    cat = await first.spawn(request("/bin/cat", stdin=True, description=b"cat"))
    for proc in (writer, quitter, shell, cat):
        proc.close()  # the server dies: its ends go
    first.close()
    await asyncio.sleep(1.5)  # the writer has filled its pipe, the quitter exited

    adopted: list[AgentProcess] = []
    second = AgentSpawner(agent_socket, "host", on_adopted=adopted.extend)
    other: list[AgentProcess] = []
    third = AgentSpawner(agent_socket, "host", on_adopted=other.extend)
    try:
        await second.ready()
        await third.ready()
        assert other == []  # owned by a live connection: not handed to another
        by_name = {proc.description: proc for proc in adopted}
        assert set(by_name) == {b"writer", b"quitter", b"shell", b"cat"}
        assert {proc.pid for proc in adopted} == {writer.pid, quitter.pid, shell.pid, cat.pid}
        output = await asyncio.wait_for(collect(by_name[b"writer"]), 20)
        assert output["stdout"] == b"\0" * 3000000 + b"\nend\n"
        assert await asyncio.wait_for(by_name[b"writer"].wait(), 10) == ExitStatus(5)
        assert await asyncio.wait_for(by_name[b"quitter"].wait(), 1) == ExitStatus(7)
        assert (await asyncio.wait_for(collect(by_name[b"quitter"]), 5))["stdout"] == b"bye\n"
        await by_name[b"cat"].write_input(b"still here")
        by_name[b"cat"].close_stdin()
        assert (await asyncio.wait_for(collect(by_name[b"cat"]), 10))["stdout"] == b"still here"
        assert await asyncio.wait_for(by_name[b"cat"].wait(), 10) == ExitStatus(0)
        pty = by_name[b"shell"]
        await pty.write_input(b"echo $((6 * 7)); exit 3\n")
        text = (await asyncio.wait_for(collect(pty), 10))["pty"]
        assert b"42" in text, text
        assert await asyncio.wait_for(pty.wait(), 10) == ExitStatus(3)
    finally:
        for proc in adopted + other:
            proc.close()
        second.close()
        third.close()


async def test_real_agent_bounds_remembered_exits(agent_socket: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    first = AgentSpawner(agent_socket, "host")
    script = f"read x < {fifo}; exit $1"  # all wait until the FIFO's writer comes and goes
    procs = [await first.spawn(request("/bin/sh", "-c", script, "sh", str(i % 200))) for i in range(260)]
    for proc in procs:
        proc.close()
    first.close()
    await asyncio.sleep(0.2)
    os.close(os.open(fifo, os.O_WRONLY))
    await asyncio.sleep(1)
    adopted: list[AgentProcess] = []
    second = AgentSpawner(agent_socket, "host", on_adopted=adopted.extend)
    try:
        await second.ready()
        assert len(adopted) == 256  # MAX_EXITED: the oldest exits are forgotten
        assert {(await p.wait()).exit_code for p in adopted} <= set(range(200))
    finally:
        for proc in adopted:
            proc.close()
        second.close()


# -- where the agent is used ------------------------------------------------------------------------


def test_init_config_with_and_without_the_agent() -> None:
    from corral.node.runtime.oci import INIT_PATH, build_sandbox_config
    from corral.node.runtime.runtimes import traits_for

    common: dict[str, Any] = {
        "sandbox_id": "abc", "rootfs": "/r", "netns_path": "/n", "init_binary": "/i", "etc_files": {},
        "cpu_count": 1, "memory_mb": 64, "pids_limit": 64, "nofile_hard": 1024, "cgroups_path": "/c/abc",
    }  # fmt: skip
    agent = build_sandbox_config(**common, exec_agent=True)["process"]
    catatonit = build_sandbox_config(**common)["process"]
    assert (agent["args"], agent["noNewPrivileges"]) == ([INIT_PATH], False)  # its children run sudo
    assert (catatonit["args"], catatonit["noNewPrivileges"]) == ([INIT_PATH, "-P"], True)
    assert traits_for("crun").exec_agent and traits_for("/usr/bin/crun").exec_agent
    assert not traits_for("runsc").exec_agent  # no fds into the sandbox: catatonit and `runsc exec`


def test_process_description_round_trip_and_bounds() -> None:
    from corral.node.envd.process import describe_process, read_description
    from corral.spec._generated.process import process_pb as pb

    config = pb.ProcessConfig(cmd="/bin/bash", args=["-l", "-c", "sleep 1"], envs={"A": "1"}, cwd="/tmp")
    data = describe_process(config, "web", True, 1234.5)
    back, tag, pty, deadline = read_description(data)
    assert (back.cmd, list(back.args), dict(back.envs), back.cwd) == (
        "/bin/bash",
        ["-l", "-c", "sleep 1"],
        {"A": "1"},
        "/tmp",
    )
    assert (tag, pty, deadline) == ("web", True, 1234.5)
    plain, tag, pty, deadline = read_description(
        describe_process(pb.ProcessConfig(cmd="ls"), None, False, None)
    )
    assert (plain.cmd, plain.has_field("cwd"), tag, pty, deadline) == ("ls", False, None, False, None)
    # Too large for the agent (MAX_DESCRIPTION): envs go first, then args; the rest stays.
    huge_env = pb.ProcessConfig(cmd="env", args=["x"], envs={"BIG": "v" * 20000})
    assert len(describe_process(huge_env, "t", False, None)) <= MAX_DESCRIPTION
    back, tag, _, _ = read_description(describe_process(huge_env, "t", False, None))
    assert (back.cmd, list(back.args), dict(back.envs), tag) == ("env", ["x"], {}, "t")
    huge_args = pb.ProcessConfig(cmd="echo", args=["a" * 20000])
    back, _, _, _ = read_description(describe_process(huge_args, None, False, None))
    assert (back.cmd, list(back.args)) == ("echo", [])


@pytest.mark.parametrize(
    "data",
    [b"", b"\xff\xfe", b"[]", b"null", b'{"cmd": 5}', b'{"args": "x"}', b'{"envs": {"A": 1}}', b'{"tag": []}',
     b'{"pty": "yes"}', b'{"deadline": "soon"}', b'{"deadline": true}', b'{"cwd": 1}'],
)  # fmt: skip
def test_process_description_from_a_hostile_agent_reads_as_empty(data: bytes) -> None:
    from corral.node.envd.process import read_description

    config, tag, pty, deadline = read_description(data)
    assert (config.cmd, list(config.args), tag, pty, deadline) == ("", [], None, False, None)

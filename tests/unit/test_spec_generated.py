"""Our generated envd code speaks the same wire as the official e2b 2.45.1 SDK.

Two kinds of evidence, neither needing Corral's real envd server:
* the descriptors generated from our .proto files have the same wire shape (packages, field
  names/numbers/JSON names/types/presence, enum values, RPC kinds) as the ones in the SDK;
* a test-local fake service mounted in our generated ``*ASGIApplication`` is driven over real
  HTTP/1.1 (uvicorn on loopback) by the SDK's own high-level ``Commands``/``Filesystem`` classes,
  plus a few hand-written requests that pin down JSON details.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import e2b.envd.filesystem.filesystem_pb as sdk_filesystem_pb
import e2b.envd.process.process_pb as sdk_process_pb
import httpx
import pytest
import uvicorn
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from e2b import CommandExitException
from e2b.connection_config import ConnectionConfig
from e2b.sandbox.filesystem.filesystem import FileType
from e2b.sandbox.filesystem.watch_handle import FilesystemEventType
from e2b.sandbox_async.commands.command import Commands
from e2b.sandbox_async.filesystem.filesystem import Filesystem
from packaging.version import Version
from protobuf import Oneof
from protobuf.wkt import Timestamp

from corral.spec.envd import (
    envd_codecs,
    filesystem_connect,
    filesystem_pb,
    process_connect,
    process_pb,
)

REPO = Path(__file__).resolve().parents[2]
ENVD_VERSION = Version("0.6.13")
# Over 2**32, so a 32-bit mix-up or a lost int64-as-string would show.
BIG_SIZE = 5_000_000_123
MODIFIED = datetime(2025, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)


# --------------------------------------------------------------------------- descriptor shape


def _wire_shape(file_proto: Any) -> dict[str, Any]:
    """Everything about a .proto file that reaches the wire, keyed by full name."""
    shape: dict[str, Any] = {"$file": (file_proto.name, file_proto.package, sorted(file_proto.dependency))}

    def walk(message: Any, prefix: str) -> None:
        full = f"{prefix}.{message.name}"
        oneofs = [o.name for o in message.oneof_decl]
        shape[full] = {
            f.number: (
                f.name,
                f.json_name,
                int(f.type),
                int(f.label),
                f.type_name,
                f.proto3_optional,
                oneofs[f.oneof_index] if f.has_field("oneof_index") else None,
            )
            for f in message.field
        }
        for nested in message.nested_type:
            walk(nested, full)
        for enum in message.enum_type:
            shape[f"{full}.{enum.name}"] = {v.name: v.number for v in enum.value}

    for message in file_proto.message_type:
        walk(message, file_proto.package)
    for enum in file_proto.enum_type:
        shape[f"{file_proto.package}.{enum.name}"] = {v.name: v.number for v in enum.value}
    for service in file_proto.service:
        shape[f"{file_proto.package}.{service.name}"] = {
            m.name: (m.input_type, m.output_type, m.client_streaming, m.server_streaming)
            for m in service.method
        }
    return shape


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(process_pb, sdk_process_pb), (filesystem_pb, sdk_filesystem_pb)],
    ids=["process", "filesystem"],
)
def test_descriptor_wire_shape_matches_official_sdk(ours: Any, theirs: Any) -> None:
    our_shape = _wire_shape(ours.desc().proto)
    their_shape = _wire_shape(theirs.desc().proto)
    assert our_shape.keys() == their_shape.keys()
    for name, value in their_shape.items():
        assert our_shape[name] == value, name


def test_rpc_kinds_and_paths() -> None:
    services = {s.name: s for s in process_pb.desc().services + filesystem_pb.desc().services}
    kinds = {
        f"/{s.type_name}/{m.name}": (m.proto.client_streaming, m.proto.server_streaming)
        for s in services.values()
        for m in s.methods
    }
    assert kinds["/process.Process/Start"] == (False, True)
    assert kinds["/process.Process/Connect"] == (False, True)
    assert kinds["/process.Process/StreamInput"] == (True, False)
    assert kinds["/process.Process/SendSignal"] == (False, False)
    assert kinds["/filesystem.Filesystem/WatchDir"] == (False, True)
    assert kinds["/filesystem.Filesystem/GetWatcherEvents"] == (False, False)
    assert len(kinds) == 8 + 9


def test_sdk_request_json_decodes_into_our_messages() -> None:
    """The exact request the SDK's commands.run sends (e2b-protocol.md §1.5)."""
    wire = (
        '{"process":{"cmd":"/bin/bash","args":["-l","-c","echo hi"],"envs":{"A":"b"},"cwd":"/tmp"},'
        '"stdin":false}'
    )
    request = process_pb.StartRequest.from_json(wire)
    assert request.process is not None
    assert request.process.args == ["-l", "-c", "echo hi"]
    assert request.process.envs == {"A": "b"}
    assert request.process.has_field("cwd")
    assert request.has_field("stdin") and request.stdin is False
    assert not request.has_field("pty")
    # Round trip: presence keeps "stdin": false on the wire.
    assert json.loads(request.to_json()) == json.loads(wire)


@pytest.mark.skipif(
    shutil.which("protoc") is None or not (REPO / "build/tools-venv/bin/protoc-gen-py").exists(),
    reason="needs protoc (apt protobuf-compiler) and the generator venv (run scripts/generate.sh once)",
)
def test_generated_code_is_up_to_date() -> None:
    result = subprocess.run(
        ["bash", str(REPO / "scripts/generate.sh"), "--check"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


# --------------------------------------------------------------------------- fake envd over HTTP


@dataclass
class Recorder:
    """What the fake services saw, for assertions on the request side of the wire."""

    requests: list[Any] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    def note(self, request: Any, ctx: Any) -> None:
        self.requests.append(request)
        self.headers.append({k.lower(): v for k, v in ctx.request_headers.items()})


def _entry(path: str, *, symlink_target: str | None = None) -> filesystem_pb.EntryInfo:
    entry = filesystem_pb.EntryInfo(
        name=path.rsplit("/", 1)[-1],
        type=filesystem_pb.FileType.FILE,
        path=path,
        size=BIG_SIZE,
        mode=0o644,
        permissions="Lrwxrwxrwx" if symlink_target else "-rw-r--r--",
        owner="user",
        group="user",
        modified_time=Timestamp.from_datetime(MODIFIED),
        metadata={"k": "v"},
    )
    if symlink_target is not None:
        entry.symlink_target = symlink_target
    return entry


class FakeProcess(process_connect.Process):
    """Start by command text ('echo hi' ok, 'fail' exits 3, else killed) and SendSignal to pid 42."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def start(
        self, request: process_pb.StartRequest, ctx: Any
    ) -> AsyncIterator[process_pb.StartResponse]:
        self.recorder.note(request, ctx)
        command = request.process.args[-1] if request.process and request.process.args else ""
        event = process_pb.ProcessEvent

        def respond(kind: str, value: Any) -> process_pb.StartResponse:
            return process_pb.StartResponse(event=event(event=Oneof(kind, value)))

        yield respond("start", event.StartEvent(pid=42))
        yield respond("keepalive", event.KeepAlive())
        if command == "echo hi":
            yield respond("data", event.DataEvent(output=Oneof("stdout", b"hi\n")))
            end = event.EndEvent(exit_code=0, exited=True, status="exit status 0")
        elif command == "fail":
            yield respond("data", event.DataEvent(output=Oneof("stderr", b"bad\n")))
            end = event.EndEvent(exit_code=3, exited=True, status="exit status 3", error="exit status 3")
        else:
            end = event.EndEvent(exit_code=-1, exited=False, status="signal: killed", error="signal: killed")
        yield respond("end", end)

    async def send_signal(
        self, request: process_pb.SendSignalRequest, ctx: Any
    ) -> process_pb.SendSignalResponse:
        self.recorder.note(request, ctx)
        if request.process is None or request.process.selector != Oneof("pid", 42):
            raise ConnectError(Code.NOT_FOUND, "process not found")
        return process_pb.SendSignalResponse()


class FakeFilesystem(filesystem_connect.Filesystem):
    """Stat, WatchDir and GetWatcherEvents; every other RPC is the generated UNIMPLEMENTED default."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def stat(self, request: filesystem_pb.StatRequest, ctx: Any) -> filesystem_pb.StatResponse:
        self.recorder.note(request, ctx)
        if request.path == "/home/user/link":
            return filesystem_pb.StatResponse(entry=_entry(request.path, symlink_target="/home/user/target"))
        if request.path == "/home/user/missing":
            raise ConnectError(Code.NOT_FOUND, "no such file or directory")
        return filesystem_pb.StatResponse(entry=_entry(request.path))

    async def watch_dir(
        self, request: filesystem_pb.WatchDirRequest, ctx: Any
    ) -> AsyncIterator[filesystem_pb.WatchDirResponse]:
        self.recorder.note(request, ctx)
        response = filesystem_pb.WatchDirResponse
        yield response(event=Oneof("start", response.StartEvent()))
        yield response(event=Oneof("keepalive", response.KeepAlive()))
        created = filesystem_pb.FilesystemEvent(
            name="nested/file.txt",
            type=filesystem_pb.EventType.CREATE,
            entry=_entry(f"{request.path}/nested/file.txt"),
        )
        yield response(event=Oneof("filesystem", created))

    async def get_watcher_events(
        self, request: filesystem_pb.GetWatcherEventsRequest, ctx: Any
    ) -> filesystem_pb.GetWatcherEventsResponse:
        self.recorder.note(request, ctx)
        return filesystem_pb.GetWatcherEventsResponse(
            events=[filesystem_pb.FilesystemEvent(name="a", type=filesystem_pb.EventType.CHMOD)]
        )


def _router(*apps: Any) -> Any:
    """A plain ASGI app sending each request to the Connect app whose service path prefixes it."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        for sub in apps:
            if scope["path"].startswith(sub.path + "/"):
                await sub(scope, receive, send)
                return
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    return app


@dataclass
class FakeEnvd:
    url: str
    recorder: Recorder


@pytest.fixture(scope="module")
def fake_envd() -> Iterator[FakeEnvd]:
    recorder = Recorder()
    app = _router(
        process_connect.ProcessASGIApplication(FakeProcess(recorder), codecs=envd_codecs()),
        filesystem_connect.FilesystemASGIApplication(FakeFilesystem(recorder), codecs=envd_codecs()),
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="fake-envd", daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "fake envd did not start"
        time.sleep(0.01)
    try:
        yield FakeEnvd(url=f"http://127.0.0.1:{port}", recorder=recorder)
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()


def _sdk_config() -> ConnectionConfig:
    return ConnectionConfig(api_key="e2b_0", debug=False, request_timeout=5)


async def test_sdk_commands_run_decodes_start_stream(fake_envd: FakeEnvd) -> None:
    async with httpx.AsyncClient(base_url=fake_envd.url) as envd_api:
        commands = Commands(fake_envd.url, _sdk_config(), ENVD_VERSION, envd_api)
        result = await commands.run("echo hi", envs={"A": "b"}, cwd="/tmp", timeout=5)
    assert (result.stdout, result.stderr, result.exit_code, result.error) == ("hi\n", "", 0, None)

    request = fake_envd.recorder.requests[-1]
    assert isinstance(request, process_pb.StartRequest)
    assert request.process.cmd == "/bin/bash"
    assert request.process.args == ["-l", "-c", "echo hi"]
    assert request.process.envs == {"A": "b"}
    assert request.process.cwd == "/tmp"
    assert request.has_field("stdin") and request.stdin is False
    assert not request.has_field("pty") and not request.has_field("tag")
    headers = fake_envd.recorder.headers[-1]
    assert headers["content-type"] == "application/connect+json"
    assert headers["keepalive-ping-interval"] == "50"
    assert headers["connect-timeout-ms"] == "5000"


@pytest.mark.parametrize(
    ("command", "exit_code", "error", "stderr"),
    [("fail", 3, "exit status 3", "bad\n"), ("killed", -1, "signal: killed", "")],
)
async def test_sdk_commands_run_nonzero_end_event(
    fake_envd: FakeEnvd, command: str, exit_code: int, error: str, stderr: str
) -> None:
    async with httpx.AsyncClient(base_url=fake_envd.url) as envd_api:
        commands = Commands(fake_envd.url, _sdk_config(), ENVD_VERSION, envd_api)
        with pytest.raises(CommandExitException) as caught:
            await commands.run(command, timeout=5)
    assert (caught.value.exit_code, caught.value.error, caught.value.stderr) == (exit_code, error, stderr)


async def test_sdk_kill_sends_sigkill_and_maps_not_found(fake_envd: FakeEnvd) -> None:
    async with httpx.AsyncClient(base_url=fake_envd.url) as envd_api:
        commands = Commands(fake_envd.url, _sdk_config(), ENVD_VERSION, envd_api)
        assert await commands.kill(42) is True
        assert fake_envd.recorder.requests[-1].signal == process_pb.Signal.SIGKILL
        assert await commands.kill(7) is False


async def test_sdk_stat_decodes_entry_info(fake_envd: FakeEnvd) -> None:
    async with httpx.AsyncClient(base_url=fake_envd.url) as envd_api:
        files = Filesystem(fake_envd.url, ENVD_VERSION, _sdk_config(), envd_api)
        link = await files.get_info("/home/user/link")
        plain = await files.get_info("/home/user/plain.txt")
        assert await files.exists("/home/user/missing") is False

    assert link.name == "link" and link.path == "/home/user/link"
    assert link.type == FileType.FILE
    assert link.size == BIG_SIZE
    assert link.mode == 0o644
    assert link.permissions == "Lrwxrwxrwx"
    assert (link.owner, link.group) == ("user", "user")
    assert link.modified_time == MODIFIED
    assert link.symlink_target == "/home/user/target"
    assert link.metadata == {"k": "v"}
    # proto3 `optional`: an absent symlink_target must reach the SDK as None, not "".
    assert plain.symlink_target is None


async def test_sdk_watch_dir_stream(fake_envd: FakeEnvd) -> None:
    events: list[Any] = []
    exited = asyncio.Event()

    def on_exit(error: Exception | None) -> None:
        events.append(("exit", error))
        exited.set()

    async with httpx.AsyncClient(base_url=fake_envd.url) as envd_api:
        files = Filesystem(fake_envd.url, ENVD_VERSION, _sdk_config(), envd_api)
        handle = await files.watch_dir(
            "/home/user/dir", on_event=events.append, on_exit=on_exit, recursive=True, include_entry=True
        )
        await asyncio.wait_for(exited.wait(), 5)
        await handle.stop()

    request = fake_envd.recorder.requests[-1]
    assert isinstance(request, filesystem_pb.WatchDirRequest)
    assert (request.path, request.recursive, request.include_entry) == ("/home/user/dir", True, True)
    event, end = events
    assert event.name == "nested/file.txt"
    assert event.type == FilesystemEventType.CREATE
    assert event.entry is not None and event.entry.size == BIG_SIZE
    assert end == ("exit", None)


async def test_response_json_shape(fake_envd: FakeEnvd) -> None:
    """Pin what our server emits: camelCase names, int64 as string, enum names, RFC 3339 times."""
    async with httpx.AsyncClient(base_url=fake_envd.url) as client:
        response = await client.post(
            "/filesystem.Filesystem/Stat",
            content=b'{"path":"/home/user/link"}',
            headers={"content-type": "application/json", "connect-protocol-version": "1"},
        )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    entry = response.json()["entry"]
    assert entry["size"] == str(BIG_SIZE)
    assert entry["type"] == "FILE_TYPE_FILE"
    assert entry["symlinkTarget"] == "/home/user/target"
    assert entry["modifiedTime"] == "2025-03-04T05:06:07.123456Z"
    assert entry["mode"] == 0o644


async def test_request_json_snake_case_numbers_and_unknown_fields(fake_envd: FakeEnvd) -> None:
    headers = {"content-type": "application/json", "connect-protocol-version": "1"}
    async with httpx.AsyncClient(base_url=fake_envd.url) as client:
        events = await client.post(
            "/filesystem.Filesystem/GetWatcherEvents",
            content=b'{"watcher_id":"w-1","fieldFromTheFuture":{"x":1}}',
            headers=headers,
        )
        assert events.status_code == 200, events.text
        assert fake_envd.recorder.requests[-1].watcher_id == "w-1"
        assert events.json() == {"events": [{"name": "a", "type": "EVENT_TYPE_CHMOD"}]}

        signal = await client.post(
            "/process.Process/SendSignal", content=b'{"process":{"pid":"42"},"signal":9}', headers=headers
        )
        assert signal.status_code == 200, signal.text
        assert signal.json() == {}
        request = fake_envd.recorder.requests[-1]
        assert (request.process.selector, request.signal) == (Oneof("pid", 42), process_pb.Signal.SIGKILL)

        missing = await client.post(
            "/process.Process/SendSignal",
            content=b'{"process":{"pid":7},"signal":"SIGNAL_SIGKILL"}',
            headers=headers,
        )
        assert missing.status_code == 404
        assert missing.json()["code"] == "not_found"

        garbage = await client.post("/process.Process/SendSignal", content=b'{"process":', headers=headers)
        assert garbage.status_code == 400
        assert garbage.json()["code"] == "invalid_argument"


async def test_default_codec_rejects_unknown_fields_which_is_why_envd_codecs_exists() -> None:
    """connectrpc's stock JSON codec is strict; a server without envd_codecs() breaks newer SDKs."""
    body = b'{"watcher_id":"w-1","fieldFromTheFuture":1}'
    headers = {"content-type": "application/json", "connect-protocol-version": "1"}
    strict = filesystem_connect.FilesystemASGIApplication(FakeFilesystem(Recorder()))
    transport = httpx.ASGITransport(app=strict, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://envd") as client:
        response = await client.post("/filesystem.Filesystem/GetWatcherEvents", content=body, headers=headers)
    assert response.status_code == 500

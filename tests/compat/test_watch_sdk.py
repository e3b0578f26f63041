"""Directory watches through the real server with the official SDK: the polling trio (sync SDK),
the WatchDir stream (async SDK), exact kernel event sequences, limits and cleanup on kill."""

from __future__ import annotations

import asyncio
import json
import os
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2b import (
    AsyncSandbox,
    FileNotFoundException,
    FilesystemEvent,
    FilesystemEventType,
    FileType,
    InvalidArgumentException,
    RateLimitException,
    Sandbox,
    SandboxException,
)

from tests import gvisor
from tests.conftest import ServerProcess

pytestmark = pytest.mark.compat

CREATE, WRITE, CHMOD, REMOVE, RENAME = (
    FilesystemEventType.CREATE,
    FilesystemEventType.WRITE,
    FilesystemEventType.CHMOD,
    FilesystemEventType.REMOVE,
    FilesystemEventType.RENAME,
)


def _dir(sbx: Sandbox) -> str:
    name = f"w{uuid.uuid4().hex[:8]}"
    sbx.files.make_dir(name)
    return name


def _pairs(events: list[FilesystemEvent]) -> list[tuple[str, FilesystemEventType]]:
    return [(e.name, e.type) for e in events]


def server_inotify_watches(server: ServerProcess) -> int:
    """Kernel watches held by the server process (from /proc/<pid>/fdinfo of its inotify fds)."""
    assert server.proc is not None
    pid = server.proc.pid
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:inotify":
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        count += sum(1 for line in info.splitlines() if line.startswith("inotify wd:"))
    return count


# -- polling watchers (sync SDK: CreateWatcher / GetWatcherEvents / RemoveWatcher) --------------


def test_new_file_upload_gives_exactly_create_chmod_write_at_once(sandbox: Sandbox) -> None:
    d = _dir(sandbox)
    handle = sandbox.files.watch_dir(d)
    sandbox.files.write(f"{d}/f.txt", "hello")
    assert _pairs(handle.get_new_events()) == [("f.txt", CREATE), ("f.txt", CHMOD), ("f.txt", WRITE)]
    sandbox.files.write(f"{d}/f.txt", "changed")  # overwrite: no CREATE
    events = _pairs(handle.get_new_events())
    assert ("f.txt", WRITE) in events and ("f.txt", CREATE) not in events
    sandbox.files.rename(f"{d}/f.txt", f"{d}/g.txt")
    sandbox.files.remove(f"{d}/g.txt")
    assert _pairs(handle.get_new_events()) == [("f.txt", RENAME), ("g.txt", CREATE), ("g.txt", REMOVE)]
    assert handle.get_new_events() == []
    handle.stop()
    with pytest.raises(SandboxException):
        handle.get_new_events()


@gvisor.GOFER_ATTRIB
def test_events_from_sandbox_processes_and_entries(sandbox: Sandbox) -> None:
    d = _dir(sandbox)
    handle = sandbox.files.watch_dir(d, include_entry=True)
    sandbox.commands.run(f"echo hi > {d}/by-shell; mkdir {d}/sub; rm {d}/by-shell")
    events = handle.get_new_events()
    assert _pairs(events) == [
        ("by-shell", CREATE),
        ("by-shell", WRITE),
        ("sub", CREATE),
        ("by-shell", REMOVE),
    ]
    assert events[0].entry is None  # already gone when the events were read: best effort, like envd
    assert events[2].entry is not None and events[2].entry.type == FileType.DIR
    assert events[2].entry.path == f"/home/user/{d}/sub" and events[2].entry.owner == "user"
    assert events[3].entry is None  # never for REMOVE
    handle.stop()


def test_recursive_existing_and_new_nested_directories(sandbox: Sandbox) -> None:
    d = _dir(sandbox)
    sandbox.files.make_dir(f"{d}/nested")
    handle = sandbox.files.watch_dir(d, recursive=True)
    sandbox.files.write(f"{d}/nested/file", "x")
    assert _pairs(handle.get_new_events()) == [
        ("nested/file", CREATE),
        ("nested/file", CHMOD),
        ("nested/file", WRITE),
    ]
    sandbox.files.make_dir(f"{d}/later")
    sandbox.files.write(f"{d}/later/file", "y")  # right after MakeDir: the new directory is watched already
    events = _pairs(handle.get_new_events())
    assert events[0] == ("later", CREATE)
    assert ("later/file", CREATE) in events and ("later/file", WRITE) in events
    # mkdir -p from a process: everything below the first new directory is reported too
    sandbox.commands.run(f"mkdir -p {d}/a/b/c && touch {d}/a/b/c/t")
    events = _pairs(handle.get_new_events())
    assert events[0] == ("a", CREATE) and ("a/b/c", CREATE) in events and ("a/b/c/t", CREATE) in events
    handle.stop()


def test_watch_errors(sandbox: Sandbox) -> None:
    with pytest.raises(FileNotFoundException):
        sandbox.files.watch_dir("no-such-dir")
    sandbox.files.write("plain-file.txt", "x")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.watch_dir("plain-file.txt")


def test_watcher_limit_is_a_clear_error(sandbox: Sandbox) -> None:
    d = _dir(sandbox)
    handles = []
    try:
        with pytest.raises(RateLimitException, match="too many directory watchers"):
            for _ in range(200):
                handles.append(sandbox.files.watch_dir(d))
        assert 0 < len(handles) < 200
    finally:
        for h in handles:
            h.stop()
    sandbox.files.watch_dir(d).stop()  # room again


# -- WatchDir streams (async SDK) -------------------------------------------------------------------


async def _collect_until(events: list[FilesystemEvent], done: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


async def test_async_watch_stream(sandbox: Sandbox) -> None:
    asbx = await AsyncSandbox.connect(sandbox.sandbox_id)
    d = _dir(sandbox)
    await asbx.files.make_dir(f"{d}/nested")
    got: list[FilesystemEvent] = []
    handle = await asbx.files.watch_dir(d, on_event=got.append, recursive=True, include_entry=True)
    await asbx.files.write(f"{d}/nested/file.txt", "content")
    await _collect_until(got, lambda: len(got) >= 3)
    assert _pairs(got) == [
        ("nested/file.txt", CREATE),
        ("nested/file.txt", CHMOD),
        ("nested/file.txt", WRITE),
    ]
    assert got[2].entry is not None and got[2].entry.path == f"/home/user/{d}/nested/file.txt"
    assert got[2].entry.type == FileType.FILE and got[2].entry.size == len("content")
    await handle.stop()


async def test_async_watch_errors(sandbox: Sandbox) -> None:
    asbx = await AsyncSandbox.connect(sandbox.sandbox_id)
    with pytest.raises(FileNotFoundException):
        await asbx.files.watch_dir("missing-dir", on_event=lambda e: None)
    await asbx.files.write("async-file.txt", "x")
    with pytest.raises(SandboxException):
        await asbx.files.watch_dir("async-file.txt", on_event=lambda e: None)


def _envelope(message: dict[str, Any]) -> bytes:
    data = json.dumps(message).encode()
    return struct.pack(">BI", 0, len(data)) + data


def _read_envelopes(buf: bytes) -> tuple[list[tuple[int, dict[str, Any]]], bytes]:
    out = []
    while len(buf) >= 5:
        flags, length = struct.unpack(">BI", buf[:5])
        if len(buf) < 5 + length:
            break
        out.append((flags, json.loads(buf[5 : 5 + length])))
        buf = buf[5 + length :]
    return out, buf


def _stream_watch(
    server: ServerProcess, sbx: Sandbox, path: str, headers: dict[str, str]
) -> Iterator[tuple[int, dict[str, Any]]]:
    all_headers = {
        "content-type": "application/connect+json",
        "connect-protocol-version": "1",
        "e2b-sandbox-id": sbx.sandbox_id,
        "e2b-sandbox-port": "49983",
        "x-access-token": sbx._envd_access_token or "",
        **headers,
    }
    with httpx.stream(
        "POST", f"{server.url}/filesystem.Filesystem/WatchDir", content=_envelope({"path": path}),
        headers=all_headers, timeout=20,
    ) as response:  # fmt: skip
        assert response.status_code == 200
        buf = b""
        for chunk in response.iter_raw():
            messages, buf = _read_envelopes(buf + chunk)
            yield from messages


def test_stream_starts_then_keeps_alive_then_ends_at_its_timeout(
    e2b_env: ServerProcess, sandbox: Sandbox
) -> None:
    d = _dir(sandbox)
    started = time.monotonic()
    seen = list(
        _stream_watch(e2b_env, sandbox, d, {"keepalive-ping-interval": "1", "connect-timeout-ms": "2500"})
    )
    elapsed = time.monotonic() - started
    assert seen[0] == (0, {"start": {}})
    assert (0, {"keepalive": {}}) in seen[1:-1]
    assert seen[-1][0] == 2 and seen[-1][1]["error"]["code"] == "deadline_exceeded"
    assert 2.0 < elapsed < 8


def test_kill_removes_the_sandbox_watchers(e2b_env: ServerProcess) -> None:
    baseline = server_inotify_watches(e2b_env)
    victim = Sandbox.create(timeout=60)
    victim.files.make_dir("a/b/c")
    victim.files.watch_dir("a", recursive=True)
    victim.files.watch_dir("/home/user")
    assert server_inotify_watches(e2b_env) == baseline + 4  # a, a/b, a/b/c, /home/user

    async def stream_then_kill() -> tuple[float, Exception | None]:
        asbx = await AsyncSandbox.connect(victim.sandbox_id)
        ended = asyncio.Event()
        outcome: list[Exception | None] = []

        def on_exit(error: Exception | None) -> None:
            outcome.append(error)
            ended.set()

        await asbx.files.watch_dir("a", on_event=lambda e: None, on_exit=on_exit)
        killed_at = time.monotonic()
        await asbx.kill()
        await asyncio.wait_for(ended.wait(), timeout=15)  # not only at the next keepalive (50 s)
        return time.monotonic() - killed_at, outcome[0]

    took, error = asyncio.run(stream_then_kill())
    assert took < 10 and error is not None
    deadline = time.monotonic() + 5
    while server_inotify_watches(e2b_env) != baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server_inotify_watches(e2b_env) == baseline

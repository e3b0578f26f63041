"""The file APIs cannot reach the host (gVisor classes HostLeak / Escape / HostDoS, attacker =
SandboxRoot): a canary directory on the host is never read, written, listed, renamed, removed or
watched through any file API of the real server — not with absolute, relative, `/proc/self/root`
or `/proc/1/root` symlinks, dangling symlinks, `..`, NUL bytes, over-long paths, FIFOs, signed URLs,
nor while a sandbox process swaps a directory for a symlink to the host in a loop.

Every symlink is made from inside the sandbox with `commands.run` (as root there), the way a
hostile sandbox would. The canary is checked byte for byte (names, contents, modes, mtimes) after
every attack, and no answer of any API may contain its secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2b import AsyncSandbox, InvalidArgumentException, Sandbox

from tests import gvisor
from tests.conftest import ServerProcess

pytestmark = [pytest.mark.compat, pytest.mark.integration]

SECRET = "canary-" + secrets.token_hex(16)


@pytest.fixture(scope="module")
def canary() -> Iterator[Path]:
    """A host directory outside any sandbox: canary.txt and sub/nested.txt hold the secret."""
    path = Path(tempfile.mkdtemp(prefix="corral-canary-", dir="/tmp"))
    (path / "canary.txt").write_text(SECRET)
    (path / "sub").mkdir()
    (path / "sub" / "nested.txt").write_text(SECRET)
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _snapshot(root: Path) -> list[tuple[str, int, int, bytes]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            data = p.read_bytes() if stat.S_ISREG(st.st_mode) else b""
            out.append((str(p.relative_to(root)), st.st_mode, st.st_mtime_ns, data))
    st = root.lstat()
    return sorted(out) + [(".", st.st_mode, st.st_mtime_ns, b"")]


@pytest.fixture
def untouched(canary: Path) -> Iterator[Path]:
    """The canary, asserted unchanged (names, modes, mtimes, bytes) after the test."""
    before = _snapshot(canary)
    yield canary
    assert _snapshot(canary) == before, "the host canary was modified through a file API"


@pytest.fixture(scope="module")
def sbx(e2b_env: ServerProcess) -> Iterator[Sandbox]:
    sandbox = Sandbox.create(timeout=300)
    try:
        yield sandbox
    finally:
        sandbox.kill()


def _attempt(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The call's result, or the exception it raised; either way it must not hold the secret."""
    try:
        result = call(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - failing is the expected outcome of most attacks
        result = exc
    text = bytes(result).decode("latin-1") if isinstance(result, bytes | bytearray) else repr(result)
    assert SECRET not in text, f"host canary leaked: {text[:200]}"
    return result


def _run_root(sbx: Sandbox, command: str) -> None:
    sbx.commands.run(command, user="root", timeout=30)


def _links(sbx: Sandbox, canary: Path) -> dict[str, str]:
    """Symlinks in a fresh sandbox directory pointing at the host canary in every way we know."""
    d = f"/home/user/esc{uuid.uuid4().hex[:8]}"
    host = str(canary)
    up = "../" * 16
    targets = {
        "abs": f"{host}/canary.txt",
        "absdir": host,
        "rel": f"{up}{host.lstrip('/')}/canary.txt",
        "reldir": f"{up}{host.lstrip('/')}",
        "procself": f"/proc/self/root{host}/canary.txt",
        "procselfdir": f"/proc/self/root{host}",
        "proc1": f"/proc/1/root{host}/canary.txt",
        "proc1cwd": "/proc/1/cwd",
        "threadself": f"/proc/thread-self/root{host}",
        "dangling": f"{host}/created-by-sandbox.txt",
        "toroot": "/",
    }
    script = f"mkdir -p {d} && cd {d} && " + " && ".join(f"ln -s '{t}' {name}" for name, t in targets.items())
    _run_root(sbx, script)
    return {name: f"{d}/{name}" for name in targets}


def _read_stream(sbx: Sandbox, path: str) -> bytes:
    return b"".join(sbx.files.read(path, format="stream"))


def test_read_stat_list_through_symlinks(sbx: Sandbox, untouched: Path) -> None:
    links = _links(sbx, untouched)
    host = str(untouched)
    paths = [
        links["abs"], links["rel"], links["procself"], links["proc1"], f"{links['absdir']}/canary.txt",
        f"{links['reldir']}/canary.txt", f"{links['procselfdir']}/canary.txt", f"{links['threadself']}/canary.txt",
        f"{links['toroot']}{host}/canary.txt", f"{links['proc1cwd']}{host}/canary.txt",
        f"/proc/self/root{host}/canary.txt", f"/proc/1/root{host}/canary.txt", f"../../../../..{host}/canary.txt",
        f"{host}/canary.txt", f"{host}/sub/nested.txt",
    ]  # fmt: skip
    for path in paths:
        _attempt(sbx.files.read, path)
        _attempt(sbx.files.read, path, format="bytes", gzip=True)
        _attempt(_read_stream, sbx, path)
        _attempt(sbx.files.get_info, path)
        _attempt(sbx.files.exists, path)
    for path in (
        links["absdir"],
        links["reldir"],
        links["procselfdir"],
        links["threadself"],
        f"/proc/1/root{host}",
        host,
    ):
        _attempt(sbx.files.list, path, depth=3)
    listing = _attempt(sbx.files.list, links["abs"].rsplit("/", 1)[0], depth=5)
    assert not isinstance(listing, Exception)
    assert not any(entry.name == "nested.txt" for entry in listing)  # host dirs are never descended into


def test_write_rename_remove_through_symlinks(sbx: Sandbox, untouched: Path) -> None:
    links = _links(sbx, untouched)
    targets = [
        links["abs"], links["rel"], links["dangling"], f"{links['absdir']}/canary.txt", f"{links['reldir']}/new.txt",
        f"{links['procselfdir']}/canary.txt", links["proc1"], f"{links['toroot']}{untouched}/canary.txt",
    ]  # fmt: skip
    for path in targets:
        _attempt(sbx.files.write, path, "overwritten by the sandbox")
        _attempt(sbx.files.write, path, b"octet", use_octet_stream=True)
        _attempt(sbx.files.write, path, b"gz", gzip=True)
        _attempt(sbx.files.write, path, "meta", metadata={"k": "v"})
        _attempt(sbx.files.make_dir, path + "-dir")
        _attempt(sbx.files.rename, path, "/home/user/stolen.txt")
        _attempt(sbx.files.rename, "/etc/hostname", path)
        _attempt(sbx.files.remove, path)
    for path in (
        f"{links['absdir']}/canary.txt",
        f"{links['absdir']}/sub",
        f"{links['reldir']}/sub/nested.txt",
    ):
        _attempt(sbx.files.remove, path)
    _attempt(sbx.files.read, "/home/user/stolen.txt")


def test_bad_paths_are_refused(sbx: Sandbox, e2b_env: ServerProcess, untouched: Path) -> None:
    for path in ("a\x00b", f"{untouched}/canary.txt\x00", "x/" * 3000, "n" * 300, "/" + "a" * 256 + "/b"):
        with pytest.raises(InvalidArgumentException):
            sbx.files.get_info(path)
        _attempt(sbx.files.write, path, "x")
        _attempt(sbx.files.read, path)
    headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "X-Access-Token": sbx._envd_access_token or ""}
    with httpx.Client(base_url=e2b_env.url, headers=headers, timeout=30) as envd:
        for path in (f"{untouched}/canary.txt", f"/../../..{untouched}/canary.txt", "%2e%2e/%2e%2e/etc/passwd",
                     f"/proc/self/root{untouched}/canary.txt", f"/proc/1/root{untouched}/canary.txt"):  # fmt: skip
            assert SECRET.encode() not in _attempt(
                lambda p=path: envd.get("/files", params={"path": p}).content
            )
        # multipart filenames are sandbox paths too: these land in the sandbox's own /tmp
        files = [
            ("file", (f"../../../../..{untouched}/canary.txt", b"pwned")),
            ("file", (f"{untouched}/x", b"pwned")),
        ]
        r = envd.post("/files", files=files)
        assert r.status_code == 200
        assert [item["path"] for item in r.json()] == [f"{untouched}/canary.txt", f"{untouched}/x"]
    assert sbx.files.read(f"{untouched}/canary.txt") == "pwned"


@gvisor.FIFO
def test_fifos_and_devices_neither_block_nor_open(sbx: Sandbox) -> None:
    _run_root(sbx, "mkfifo /home/user/fifo && ln -sf /dev/zero /home/user/zero")
    started = time.monotonic()
    for path in ("/home/user/fifo", "/home/user/zero", "/dev/zero", "/dev/random"):
        with pytest.raises(InvalidArgumentException):
            sbx.files.read(path)
        with pytest.raises(InvalidArgumentException):
            sbx.files.write(path, "x")
    assert time.monotonic() - started < 10


def test_signed_urls_stay_in_the_sandbox(sbx: Sandbox, untouched: Path) -> None:
    links = _links(sbx, untouched)
    for path in (links["abs"], links["rel"], f"{links['absdir']}/canary.txt", f"{untouched}/canary.txt",
                 f"../../../..{untouched}/canary.txt", links["procself"]):  # fmt: skip
        _attempt(lambda p=path: httpx.get(sbx.download_url(p)).content)
        _attempt(
            lambda p=path: httpx.post(sbx.upload_url(p), files={"file": ("x", b"via signed url")}).content
        )


def _host_activity(canary: Path, stop: threading.Event) -> threading.Thread:
    """Touch a host-only file of the canary until `stop`: a watch that escaped would report it."""

    def touch() -> None:
        while not stop.is_set():
            os.utime(canary / "sub" / "nested.txt")
            time.sleep(0.01)

    thread = threading.Thread(target=touch, daemon=True)
    thread.start()
    return thread


def _host_unchanged(canary: Path) -> None:
    assert sorted(p.name for p in canary.rglob("*")) == ["canary.txt", "nested.txt", "sub"]
    assert (canary / "canary.txt").read_text() == SECRET and (
        canary / "sub" / "nested.txt"
    ).read_text() == SECRET


def test_watch_cannot_see_the_host(sbx: Sandbox, canary: Path) -> None:
    links = _links(sbx, canary)
    handles = []
    for path in (links["absdir"], links["reldir"], links["procselfdir"], links["threadself"], str(canary)):
        handle = _attempt(sbx.files.watch_dir, path, recursive=True)
        if not isinstance(handle, Exception):
            handles.append(handle)
    handles.append(sbx.files.watch_dir(links["abs"].rsplit("/", 1)[0], recursive=True))  # holds the links
    stop = threading.Event()
    toucher = _host_activity(canary, stop)
    time.sleep(0.3)
    stop.set()
    toucher.join()
    try:
        for handle in handles:
            events = handle.get_new_events()
            assert not any("nested" in e.name for e in events), events
    finally:
        for handle in handles:
            handle.stop()
    _host_unchanged(canary)


def test_directory_swapped_for_a_symlink_in_a_loop(sbx: Sandbox, canary: Path) -> None:
    """A sandbox process flips /home/user/swap between a real directory and symlinks to the host
    canary directory as fast as it can, while every file API works on paths through it."""
    host = str(canary)
    loop = (
        "while true; do rm -rf /home/user/swap; mkdir /home/user/swap; echo inside > /home/user/swap/canary.txt; "
        f"mkdir /home/user/swap/sub; rm -rf /home/user/swap; ln -s {host} /home/user/swap; "
        f"rm -f /home/user/swap; ln -s /proc/self/root{host} /home/user/swap; rm -f /home/user/swap; done"
    )
    flipper = sbx.commands.run(loop, background=True, user="root")
    stop = threading.Event()
    calls: list[str] = []
    events: list[str] = []

    def hammer(call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        while not stop.is_set():
            calls.append(type(_attempt(call, *args, **kwargs)).__name__)

    async def watch_repeatedly() -> None:
        asbx = await AsyncSandbox.connect(sbx.sandbox_id)
        while not stop.is_set():
            with contextlib.suppress(Exception):
                handle = await asbx.files.watch_dir(
                    "/home/user/swap", on_event=lambda e: events.append(e.name), recursive=True
                )
                await asyncio.sleep(0.05)
                await handle.stop()

    work: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = [
        (sbx.files.read, ("/home/user/swap/canary.txt",), {}),
        (sbx.files.read, ("/home/user/swap/sub/nested.txt",), {}),
        (sbx.files.write, ("/home/user/swap/written.txt", "race"), {}),
        (sbx.files.write, ("/home/user/swap/sub/deep/written.txt", "race"), {}),
        (sbx.files.list, ("/home/user/swap",), {"depth": 3}),
        (sbx.files.get_info, ("/home/user/swap/canary.txt",), {}),
        (sbx.files.rename, ("/home/user/swap/canary.txt", "/home/user/swap/moved.txt"), {}),
        (sbx.files.remove, ("/home/user/swap/sub",), {}),
        (sbx.files.make_dir, ("/home/user/swap/sub/made",), {}),
        (lambda: httpx.get(sbx.download_url("/home/user/swap/canary.txt")).content, (), {}),
    ]
    threads = [
        threading.Thread(target=hammer, args=(call, *args), kwargs=kwargs, daemon=True)
        for call, args, kwargs in work
    ]
    threads.append(threading.Thread(target=lambda: asyncio.run(watch_repeatedly()), daemon=True))
    for thread in threads:
        thread.start()
    toucher = _host_activity(canary, stop)
    time.sleep(4)
    stop.set()
    toucher.join()
    for thread in threads:
        thread.join(timeout=30)
    flipper.kill()
    assert len(calls) > 50, calls  # the race was really exercised
    assert not any("nested" in name for name in events), events
    _host_unchanged(canary)

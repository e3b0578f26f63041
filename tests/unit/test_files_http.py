"""envd `/files` endpoints driven over ASGI against a real (temporary) sandbox root."""

from __future__ import annotations

import ctypes
import gzip
import os
import stat
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from e2b.sandbox.signature import get_signature
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from corral.node.envd.confined import ConfinedRoot
from corral.node.envd.context import SCOPE_KEY, EnvdSandbox
from corral.node.envd.files_http import (
    content_disposition,
    get_file,
    negotiate_encoding,
    parse_range,
    post_files,
    sign,
    signature_error,
)

PASSWD = "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/bash\n"
GROUP = "root:x:0:\nuser:x:1000:\n"
TOKEN = "secret-token"


@pytest.fixture
def sandbox_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    (root / "home" / "user").mkdir(parents=True)
    os.chown(root / "home" / "user", 1000, 1000)
    (root / "home" / "user" / "hello.txt").write_text("hello world")
    return root


def _sandbox(root: ConfinedRoot, token: str | None) -> EnvdSandbox:
    return EnvdSandbox(
        sandbox_id="sbx1",
        template_id="base",
        access_token=token,
        env_vars={},
        root=root,
        spawner=None,  # type: ignore[arg-type]
        processes=None,  # type: ignore[arg-type]
    )


def _app(sandbox: EnvdSandbox) -> object:
    inner = Starlette(
        routes=[Route("/files", get_file, methods=["GET"]), Route("/files", post_files, methods=["POST"])]
    )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope[SCOPE_KEY] = sandbox  # what the proxy does
        await inner(scope, receive, send)

    return app


async def _client(sandbox_dir: Path, token: str | None) -> AsyncIterator[httpx.AsyncClient]:
    with ConfinedRoot.open_path(str(sandbox_dir)) as root:
        transport = httpx.ASGITransport(app=_app(_sandbox(root, token)))  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://envd") as c:
            yield c


@pytest.fixture
async def client(sandbox_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async for c in _client(sandbox_dir, None):
        yield c


@pytest.fixture
async def secured(sandbox_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async for c in _client(sandbox_dir, TOKEN):
        yield c


# -- pure helpers ----------------------------------------------------------------------------


def test_sign_matches_the_official_sdk() -> None:
    for path, user, exp in (("hello.txt", None, None), ("/a b/ü.txt", "root", 1700000000)):
        theirs = get_signature(path, "read", user, TOKEN, None)["signature"]
        assert sign(path, "read", user or "", TOKEN) == theirs
    sdk = get_signature("x", "write", "user", TOKEN, 60)
    assert sign("x", "write", "user", TOKEN, sdk["expiration"]) == sdk["signature"]


def test_signature_error_order() -> None:
    def check(**kw: object) -> str | None:
        args: dict[str, object] = {
            "header_token": None,
            "signature": None,
            "expiration": None,
            "path": "p",
            "username": None,
            "operation": "read",
            "now": 1000.0,
        }
        args.update(kw)
        return signature_error(TOKEN, **args)  # type: ignore[arg-type]

    assert (
        signature_error(
            None,
            header_token=None,
            signature=None,
            expiration=None,
            path="p",
            username=None,
            operation="read",
            now=0,
        )
        is None
    )
    assert check(header_token=TOKEN) is None
    assert check(header_token="wrong", signature=sign("p", "read", "", TOKEN)) == (
        "access token present in header but does not match"
    )
    assert check() == "missing signature query parameter"
    assert check(signature="v1_nope") == "invalid signature"
    assert check(signature=sign("p", "write", "", TOKEN)) == "invalid signature"
    assert check(signature=sign("p", "read", "", TOKEN)) is None
    expired = sign("p", "read", "", TOKEN, 999)
    assert check(signature=expired, expiration=999) == "signature is already expired"
    assert check(signature=sign("p", "read", "", TOKEN, 1000), expiration=1000) is None
    assert check(signature="v1_nope", expiration=999) == "invalid signature"  # signature first


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-4", 11, (0, 5)),
        ("bytes=6-", 11, (6, 5)),
        ("bytes=-5", 11, (6, 5)),
        ("bytes=-50", 11, (0, 11)),
        ("bytes=3-100", 11, (3, 8)),
        ("bytes=0-1,3-4", 11, None),
    ],
)
def test_parse_range(header: str, size: int, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    "header", ["bytes=11-", "bytes=-0", "bytes=5-2", "items=0-1", "bytes=a-b", "bytes=0-0"]
)
def test_parse_range_refused(header: str) -> None:
    with pytest.raises(ValueError):
        parse_range(header, 0 if header == "bytes=0-0" else 11)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, "identity"),
        ("gzip", "gzip"),
        ("gzip, deflate", "gzip"),
        ("deflate, gzip;q=0.5", "gzip"),
        ("br", "identity"),
        ("identity, gzip", "identity"),
        ("gzip;q=0, identity", "identity"),
        ("*", "identity"),
        ("*, identity;q=0", "gzip"),
        ("br, identity;q=0", None),
    ],
)
def test_negotiate_encoding(header: str | None, expected: str | None) -> None:
    assert negotiate_encoding(header) == expected


def test_content_disposition() -> None:
    assert content_disposition("hello.txt") == "inline; filename=hello.txt"
    assert content_disposition('a "b".txt') == 'inline; filename="a \\"b\\".txt"'
    assert content_disposition("ü.txt") == "inline; filename*=utf-8''%C3%BC.txt"


# -- GET /files ------------------------------------------------------------------------------


async def test_download(client: httpx.AsyncClient) -> None:
    r = await client.get("/files", params={"path": "hello.txt"}, headers={"accept-encoding": "identity"})
    assert r.status_code == 200 and r.content == b"hello world"
    assert r.headers["content-disposition"] == "inline; filename=hello.txt"
    assert r.headers["content-length"] == "11" and r.headers["accept-ranges"] == "bytes"
    assert "content-encoding" not in r.headers


async def test_download_gzip_streams_a_large_file(client: httpx.AsyncClient, sandbox_dir: Path) -> None:
    data = os.urandom(300_000) + b"a" * 300_000
    (sandbox_dir / "home" / "user" / "big.bin").write_bytes(data)
    async with client.stream(
        "GET", "/files", params={"path": "/home/user/big.bin"}, headers={"accept-encoding": "gzip"}
    ) as r:
        raw = b"".join([chunk async for chunk in r.aiter_raw()])
    assert r.headers["content-encoding"] == "gzip" and "content-length" not in r.headers
    assert gzip.decompress(raw) == data
    r = await client.get(
        "/files", params={"path": "/home/user/big.bin"}, headers={"accept-encoding": "identity"}
    )
    assert r.content == data


async def test_download_ranges(client: httpx.AsyncClient) -> None:
    r = await client.get(
        "/files", params={"path": "hello.txt"}, headers={"range": "bytes=0-4", "accept-encoding": "gzip"}
    )
    assert r.status_code == 206 and r.content == b"hello" and "content-encoding" not in r.headers
    assert r.headers["content-range"] == "bytes 0-4/11" and r.headers["content-length"] == "5"
    r = await client.get("/files", params={"path": "hello.txt"}, headers={"range": "bytes=-5"})
    assert r.status_code == 206 and r.content == b"world"
    r = await client.get("/files", params={"path": "hello.txt"}, headers={"range": "bytes=20-"})
    assert r.status_code == 416 and r.headers["content-range"] == "bytes */11"
    r = await client.get("/files", params={"path": "hello.txt"}, headers={"range": "bytes=0-1,3-4"})
    assert r.status_code == 200 and r.content == b"hello world"


async def test_download_errors(client: httpx.AsyncClient) -> None:
    r = await client.get("/files", params={"path": "/home/user"})
    assert r.status_code == 400 and r.json() == {"code": 400, "message": "path '/home/user' is a directory"}
    r = await client.get("/files", params={"path": "nope.txt"})
    assert r.status_code == 404 and r.json() == {
        "code": 404,
        "message": "path '/home/user/nope.txt' does not exist",
    }
    r = await client.get("/files", params={"path": "hello.txt", "username": "ghost"})
    assert r.status_code == 401 and r.json()["code"] == 401 and "ghost" in r.json()["message"]
    r = await client.get(
        "/files", params={"path": "hello.txt"}, headers={"accept-encoding": "br, identity;q=0"}
    )
    assert r.status_code == 406


async def test_download_through_hostile_symlinks_stays_inside(
    client: httpx.AsyncClient, sandbox_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    outside = tmp_path_factory.mktemp("outside")
    (outside / "canary").write_text("CANARY")
    os.symlink(str(outside / "canary"), sandbox_dir / "home" / "user" / "escape")
    r = await client.get("/files", params={"path": "escape"})
    assert r.status_code == 404 and "CANARY" not in r.text
    r = await client.get("/files", params={"path": "../../../../" + str(outside / "canary")})
    assert r.status_code == 404


# -- POST /files -----------------------------------------------------------------------------


async def test_upload_multipart_single_file(client: httpx.AsyncClient, sandbox_dir: Path) -> None:
    r = await client.post("/files", params={"path": "new.txt"}, files=[("file", ("new.txt", b"content"))])
    assert r.status_code == 200, r.text
    assert r.json() == [{"name": "new.txt", "path": "/home/user/new.txt", "type": "file"}]
    st = (sandbox_dir / "home" / "user" / "new.txt").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o644, 1000, 1000)
    assert (sandbox_dir / "home" / "user" / "new.txt").read_bytes() == b"content"


async def test_upload_multipart_several_files_creates_parents(
    client: httpx.AsyncClient, sandbox_dir: Path
) -> None:
    files = [
        ("file", ("a/b/one.txt", b"1")),
        ("file", ("/tmp/two.txt", b"2")),
        ("other", ("ignored.txt", b"x")),
        ("file", ("~/three.txt", b"3" * 200_000)),
    ]
    r = await client.post("/files", files=files, params={"username": "root"})
    assert r.status_code == 200, r.text
    assert [e["path"] for e in r.json()] == ["/root/a/b/one.txt", "/tmp/two.txt", "/root/three.txt"]
    assert (sandbox_dir / "root" / "a" / "b" / "one.txt").read_bytes() == b"1"
    assert (sandbox_dir / "tmp" / "two.txt").read_bytes() == b"2"
    assert (sandbox_dir / "root" / "three.txt").read_bytes() == b"3" * 200_000
    assert not (sandbox_dir / "root" / "ignored.txt").exists()
    st = (sandbox_dir / "root" / "a").stat()
    assert stat.S_IMODE(st.st_mode) == 0o755 and st.st_uid == 0

    r = await client.post("/files", files=[("file", ("x/new.txt", b"u"))])
    assert (sandbox_dir / "home/user/x").stat().st_uid == 1000


async def test_upload_duplicate_targets(client: httpx.AsyncClient, sandbox_dir: Path) -> None:
    files = [("file", ("dup.txt", b"first")), ("file", ("/home/user/dup.txt", b"second"))]
    r = await client.post("/files", files=files)
    assert r.status_code == 400
    assert r.json()["message"].startswith(
        "you cannot upload multiple files to the same path '/home/user/dup.txt'"
    )
    assert (sandbox_dir / "home" / "user" / "dup.txt").read_bytes() == b"first"
    r = await client.post(
        "/files", params={"path": "p.txt"}, files=[("file", ("a", b"1")), ("file", ("b", b"2"))]
    )
    assert r.status_code == 400


async def test_upload_octet_stream_gzip_multi_member(client: httpx.AsyncClient, sandbox_dir: Path) -> None:
    data = os.urandom(400_000)
    body = gzip.compress(data[:100_000]) + gzip.compress(data[100_000:])

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 7000):
            yield body[i : i + 7000]

    r = await client.post(
        "/files",
        params={"path": "/home/user/stream.bin"},
        content=chunks(),
        headers={"content-type": "application/octet-stream", "content-encoding": "gzip"},
    )
    assert r.status_code == 200, r.text
    assert r.json() == [{"name": "stream.bin", "path": "/home/user/stream.bin", "type": "file"}]
    assert (sandbox_dir / "home" / "user" / "stream.bin").read_bytes() == data


async def test_upload_octet_stream_errors(client: httpx.AsyncClient) -> None:
    r = await client.post("/files", content=b"x", headers={"content-type": "application/octet-stream"})
    assert r.status_code == 400
    r = await client.post(
        "/files",
        params={"path": "x"},
        content=b"not gzip",
        headers={"content-type": "application/octet-stream", "content-encoding": "gzip"},
    )
    assert r.status_code == 400 and "decompressing" in r.json()["message"]
    r = await client.post(
        "/files",
        params={"path": "x"},
        content=gzip.compress(b"abc")[:-4],
        headers={"content-type": "application/octet-stream", "content-encoding": "gzip"},
    )
    assert r.status_code == 400
    r = await client.post(
        "/files",
        params={"path": "x"},
        content=b"x",
        headers={"content-type": "application/octet-stream", "content-encoding": "br"},
    )
    assert r.status_code == 400
    r = await client.post(
        "/files", params={"path": "x"}, content=b"x", headers={"content-type": "text/plain"}
    )
    assert r.status_code == 400
    r = await client.post(
        "/files",
        params={"path": "/home/user"},
        content=b"x",
        headers={"content-type": "application/octet-stream"},
    )
    assert r.status_code == 400 and "directory" in r.json()["message"]
    r = await client.post(
        "/files",
        params={"path": "x", "username": "ghost"},
        content=b"x",
        headers={"content-type": "application/octet-stream"},
    )
    assert r.status_code == 401


async def test_upload_metadata_replaces_and_clears(client: httpx.AsyncClient, sandbox_dir: Path) -> None:
    target = sandbox_dir / "home" / "user" / "meta.txt"
    r = await client.post(
        "/files",
        params={"path": "meta.txt"},
        files=[("file", ("meta.txt", b"1"))],
        headers={"X-Metadata-Team": "red", "X-Metadata-Stage": "dev"},
    )
    assert r.json() == [
        {
            "name": "meta.txt",
            "path": "/home/user/meta.txt",
            "type": "file",
            "metadata": {"team": "red", "stage": "dev"},
        }
    ]
    assert sorted(os.listxattr(target)) == ["user.e2b.stage", "user.e2b.team"]
    assert os.getxattr(target, "user.e2b.team") == b"red"
    r = await client.post(
        "/files",
        params={"path": "meta.txt"},
        content=b"2",
        headers={"content-type": "application/octet-stream", "X-Metadata-Team": "blue"},
    )
    assert r.json()[0]["metadata"] == {"team": "blue"}
    assert os.listxattr(target) == ["user.e2b.team"]
    r = await client.post("/files", params={"path": "meta.txt"}, files=[("file", ("meta.txt", b"3"))])
    assert "metadata" not in r.json()[0]
    assert os.listxattr(target) == []
    r = await client.post(
        "/files",
        params={"path": "meta.txt"},
        files=[("file", ("meta.txt", b"3"))],
        headers={"X-Metadata-K": "v" * 5000},
    )
    assert r.status_code == 400


async def test_upload_overwrite_keeps_mode_and_truncates(
    client: httpx.AsyncClient, sandbox_dir: Path
) -> None:
    target = sandbox_dir / "home" / "user" / "hello.txt"
    os.chmod(target, 0o600)
    r = await client.post("/files", params={"path": "hello.txt"}, files=[("file", ("hello.txt", b"hi"))])
    assert r.status_code == 200
    st = target.stat()
    assert target.read_bytes() == b"hi" and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 1000


async def test_upload_through_hostile_symlinks_stays_inside(
    client: httpx.AsyncClient, sandbox_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    outside = tmp_path_factory.mktemp("outside")
    (outside / "canary").write_text("CANARY")
    os.symlink(str(outside), sandbox_dir / "home" / "user" / "outdir")
    os.symlink(str(outside / "canary"), sandbox_dir / "home" / "user" / "canary")
    # The links dangle inside the sandbox (it has no such path): the upload fails, nothing leaks out.
    r = await client.post("/files", params={"path": "outdir/evil.txt"}, files=[("file", ("e", b"evil"))])
    assert r.status_code == 404
    r = await client.post("/files", params={"path": "canary"}, files=[("file", ("e", b"evil"))])
    assert r.status_code == 404
    # Once the sandbox has that path, the same links resolve to it.
    replica = sandbox_dir / str(outside).lstrip("/")
    replica.mkdir(parents=True)
    r = await client.post("/files", params={"path": "outdir/evil.txt"}, files=[("file", ("e", b"evil"))])
    assert r.status_code == 200
    r = await client.post("/files", params={"path": "canary"}, files=[("file", ("e", b"evil"))])
    assert r.status_code == 200
    assert sorted(p.name for p in outside.iterdir()) == ["canary"]
    assert (outside / "canary").read_text() == "CANARY"
    assert (replica / "evil.txt").read_bytes() == b"evil"
    assert (replica / "canary").read_bytes() == b"evil"


# -- signatures ------------------------------------------------------------------------------


async def test_signed_download_and_upload(secured: httpx.AsyncClient) -> None:
    r = await secured.get("/files", params={"path": "hello.txt"})
    assert r.status_code == 401 and r.json() == {"code": 401, "message": "missing signature query parameter"}
    ok = await secured.get(
        "/files", params={"path": "hello.txt", "signature": sign("hello.txt", "read", "", TOKEN)}
    )
    assert ok.status_code == 200 and ok.content == b"hello world"
    sig = sign("hello.txt", "read", "user", TOKEN)
    r = await secured.get("/files", params={"path": "hello.txt", "username": "user", "signature": sig})
    assert r.status_code == 200
    r = await secured.get("/files", params={"path": "hello.txt", "signature": "v1_bad"})
    assert r.status_code == 401 and r.json()["message"] == "invalid signature"
    write_sig = sign("up.txt", "write", "", TOKEN)
    r = await secured.post(
        "/files", params={"path": "up.txt", "signature": write_sig}, files=[("file", ("up.txt", b"x"))]
    )
    assert r.status_code == 200
    r = await secured.post(
        "/files",
        params={"path": "up.txt", "signature": sign("up.txt", "read", "", TOKEN)},
        files=[("file", ("up.txt", b"x"))],
    )
    assert r.status_code == 401 and r.json()["message"] == "invalid signature"


async def test_expired_signature_exact_body(secured: httpx.AsyncClient) -> None:
    expiration = int(time.time()) - 10
    sig = sign("hello.txt", "read", "", TOKEN, expiration)
    r = await secured.get(
        "/files", params={"path": "hello.txt", "signature": sig, "signature_expiration": expiration}
    )
    assert r.status_code == 401
    assert r.content == b'{"code":401,"message":"signature is already expired"}'
    future = int(time.time()) + 60
    sig = sign("hello.txt", "read", "", TOKEN, future)
    r = await secured.get(
        "/files", params={"path": "hello.txt", "signature": sig, "signature_expiration": future}
    )
    assert r.status_code == 200
    r = await secured.get(
        "/files", params={"path": "hello.txt", "signature": sig, "signature_expiration": "soon"}
    )
    assert r.status_code == 400


async def test_access_token_header_instead_of_signature(secured: httpx.AsyncClient) -> None:
    r = await secured.get("/files", params={"path": "hello.txt"}, headers={"x-access-token": TOKEN})
    assert r.status_code == 200
    r = await secured.get(
        "/files",
        params={"path": "hello.txt", "signature": sign("hello.txt", "read", "", TOKEN)},
        headers={"x-access-token": "wrong"},
    )
    assert r.status_code == 401
    assert r.json()["message"] == "access token present in header but does not match"


# -- kernel-visible behaviour ----------------------------------------------------------------

_IN_MODIFY, _IN_ATTRIB, _IN_CREATE = 0x2, 0x4, 0x100


def _read_inotify(fd: int) -> list[tuple[int, str]]:
    events = []
    try:
        data = os.read(fd, 65536)
    except BlockingIOError:
        return events
    offset = 0
    while offset < len(data):
        _, mask, _, length = struct.unpack_from("iIII", data, offset)
        name = data[offset + 16 : offset + 16 + length].rstrip(b"\0").decode()
        events.append((mask, name))
        offset += 16 + length
    return events


async def test_new_file_upload_event_order_for_watchers(client: httpx.AsyncClient, sandbox_dir: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0
    try:
        home = str(sandbox_dir / "home" / "user").encode()
        assert libc.inotify_add_watch(fd, home, _IN_CREATE | _IN_ATTRIB | _IN_MODIFY) >= 0
        r = await client.post("/files", params={"path": "watched.txt"}, files=[("file", ("w", b"data"))])
        assert r.status_code == 200
        events = _read_inotify(fd)  # already queued when the response arrived
    finally:
        os.close(fd)
    assert events == [(_IN_CREATE, "watched.txt"), (_IN_ATTRIB, "watched.txt"), (_IN_MODIFY, "watched.txt")]


@pytest.fixture
def tiny_fs(sandbox_dir: Path) -> Iterator[str]:
    """A 64 KiB tmpfs mounted at /home/user/small inside the sandbox root."""
    small = sandbox_dir / "home" / "user" / "small"
    small.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], check=False
    ).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield "/home/user/small"
    subprocess.run(["umount", str(small)], check=True)


@pytest.mark.integration
async def test_full_disk_answers_507(client: httpx.AsyncClient, tiny_fs: str) -> None:
    r = await client.post(
        "/files",
        params={"path": f"{tiny_fs}/big.bin"},
        content=b"x" * 1_000_000,
        headers={"content-type": "application/octet-stream"},
    )
    assert r.status_code == 507
    assert r.json() == {"code": 507, "message": "not enough disk space available"}

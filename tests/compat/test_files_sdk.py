"""The filesystem RPCs and `/files` through the real server with the official SDK (sync and async):
entry fields, failure cases, uploads in every encoding, downloads, ranges, modes and ownership."""

from __future__ import annotations

import gzip
import io
import uuid
from collections.abc import Iterator

import httpx
import pytest
from e2b import (
    AsyncSandbox,
    FileNotFoundException,
    FileType,
    InvalidArgumentException,
    Sandbox,
)
from e2b.sandbox.filesystem.filesystem import WriteEntry

from tests.conftest import ServerProcess

pytestmark = pytest.mark.compat


@pytest.fixture(scope="module")
def sbx(e2b_env: ServerProcess) -> Iterator[Sandbox]:
    sandbox = Sandbox.create(timeout=300)
    try:
        yield sandbox
    finally:
        sandbox.kill()


def _name(prefix: str = "f") -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def _stat(sbx: Sandbox, path: str) -> str:
    return sbx.commands.run(f"stat -c '%U:%G %a %F' {path}", user="root").stdout.strip()


# -- RPCs: Stat, MakeDir, Move, ListDir, Remove -----------------------------------------------------


def test_stat_file_dir_and_symlink(sbx: Sandbox) -> None:
    d = _name("d")
    info = sbx.files.write(f"{d}/file.txt", "test")
    assert (info.name, info.path, info.type) == ("file.txt", f"/home/user/{d}/file.txt", FileType.FILE)
    entry = sbx.files.get_info(f"{d}/file.txt")
    assert (entry.size, entry.mode, entry.permissions) == (4, 0o644, "-rw-r--r--")
    assert (entry.owner, entry.group) == ("user", "user")
    assert entry.modified_time is not None and entry.modified_time.tzinfo is not None
    assert entry.symlink_target is None and entry.metadata is None
    folder = sbx.files.get_info(d)
    assert (folder.type, folder.mode, folder.permissions, folder.owner) == (
        FileType.DIR,
        0o755,
        "drwxr-xr-x",
        "user",
    )
    assert folder.size > 0
    sbx.commands.run(
        f"cd {d} && ln -s file.txt rel-link && ln -s /home/user/{d} abs-dir-link && ln -s nowhere dangling"
    )
    link = sbx.files.get_info(f"{d}/rel-link")
    assert (link.type, link.mode, link.permissions) == (FileType.FILE, 0o644, "Lrwxrwxrwx")
    assert link.symlink_target == f"/home/user/{d}/file.txt"
    dir_link = sbx.files.get_info(f"{d}/abs-dir-link")
    assert dir_link.type == FileType.DIR and dir_link.symlink_target == f"/home/user/{d}"
    names = [e.name for e in sbx.files.list(d)]
    assert names == ["abs-dir-link", "file.txt", "rel-link"]  # the dangling link is dropped by the SDK
    with pytest.raises(FileNotFoundException):
        sbx.files.get_info(f"{d}/missing")
    assert sbx.files.exists(f"{d}/file.txt") is True
    assert sbx.files.exists(f"{d}/missing") is False


def test_make_dir_cases(sbx: Sandbox) -> None:
    d = _name("d")
    assert sbx.files.make_dir(f"{d}/a/b") is True
    assert _stat(sbx, f"/home/user/{d}/a") == "user:user 755 directory"
    assert sbx.files.make_dir(f"{d}/a/b") is False  # ALREADY_EXISTS
    sbx.files.write(f"{d}/file", "x")
    with pytest.raises(InvalidArgumentException):
        sbx.files.make_dir(f"{d}/file")
    assert sbx.files.make_dir(f"/opt/{d}", user="root") is True
    assert _stat(sbx, f"/opt/{d}") == "root:root 755 directory"


def test_move_list_and_remove(sbx: Sandbox) -> None:
    d = _name("d")
    sbx.files.write_files(
        [WriteEntry(path=f"{d}/b.txt", data="b"), WriteEntry(path=f"{d}/sub/c.txt", data="c"),
         WriteEntry(path=f"{d}/A.txt", data="a")]
    )  # fmt: skip
    assert [e.name for e in sbx.files.list(d)] == ["A.txt", "b.txt", "sub"]  # bytewise order
    assert [e.path for e in sbx.files.list(d, depth=2)] == [
        f"/home/user/{d}/A.txt", f"/home/user/{d}/b.txt", f"/home/user/{d}/sub", f"/home/user/{d}/sub/c.txt",
    ]  # fmt: skip
    with pytest.raises(InvalidArgumentException):
        sbx.files.list(d, depth=0)
    with pytest.raises(FileNotFoundException):
        sbx.files.list(f"{d}/missing")
    with pytest.raises(InvalidArgumentException):
        sbx.files.list(f"{d}/A.txt")
    moved = sbx.files.rename(f"{d}/b.txt", f"{d}/new/place/b2.txt")
    assert moved.path == f"/home/user/{d}/new/place/b2.txt" and moved.type == FileType.FILE
    assert sbx.files.read(f"{d}/new/place/b2.txt") == "b"
    assert _stat(sbx, f"/home/user/{d}/new") == "user:user 755 directory"
    with pytest.raises(FileNotFoundException):
        sbx.files.rename(f"{d}/b.txt", f"{d}/x")
    sbx.files.remove(f"{d}/sub")
    sbx.files.remove(f"{d}/never-existed")  # not an error
    assert [e.name for e in sbx.files.list(d)] == ["A.txt", "new"]


def test_metadata(sbx: Sandbox) -> None:
    name = _name()
    info = sbx.files.write(name, "x", metadata={"Author": "mish", "purpose": "upload"})
    assert info.metadata == {"author": "mish", "purpose": "upload"}  # keys lowercased
    assert sbx.files.get_info(name).metadata == {"author": "mish", "purpose": "upload"}
    assert sbx.files.rename(name, name + "2").metadata == {"author": "mish", "purpose": "upload"}
    assert sbx.files.write(name + "2", "y").metadata is None  # overwriting clears it
    assert sbx.files.get_info(name + "2").metadata is None
    with pytest.raises(InvalidArgumentException):
        sbx.files.write(name, "x", metadata={"bad key": "v"})


# -- /files uploads -------------------------------------------------------------------------------


def test_uploads_multipart_octet_stream_and_gzip(sbx: Sandbox) -> None:
    d = _name("d")
    many = sbx.files.write_files(
        [WriteEntry(path=f"{d}/one.txt", data="1"), WriteEntry(path=f"/tmp/{d}/two.bin", data=b"\x00\x02")]
    )
    assert [(i.name, i.path) for i in many] == [
        ("one.txt", f"/home/user/{d}/one.txt"),
        ("two.bin", f"/tmp/{d}/two.bin"),
    ]
    assert sbx.files.read(f"/tmp/{d}/two.bin", format="bytes") == b"\x00\x02"
    big = bytes(range(256)) * 4096  # 1 MiB: several writes and reads
    sbx.files.write(f"{d}/octet.bin", big, use_octet_stream=True)
    sbx.files.write(f"{d}/stream.bin", io.BytesIO(big))  # file-like data → octet-stream, streamed
    sbx.files.write(f"{d}/gz.bin", big, gzip=True)
    for name in ("octet.bin", "stream.bin", "gz.bin"):
        assert bytes(sbx.files.read(f"{d}/{name}", format="bytes")) == big
    assert bytes(sbx.files.read(f"{d}/gz.bin", format="bytes", gzip=True)) == big
    assert b"".join(sbx.files.read(f"{d}/gz.bin", format="stream")) == big
    assert _stat(sbx, f"/home/user/{d}/gz.bin") == "user:user 644 regular file"
    assert _stat(sbx, f"/tmp/{d}") == "user:user 755 directory"
    root_file = sbx.files.write(f"/root/{d}.txt", "r", user="root")
    assert root_file.path == f"/root/{d}.txt"
    assert _stat(sbx, f"/root/{d}.txt") == "root:root 644 regular file"


def _envd(sbx: Sandbox, server: ServerProcess) -> httpx.Client:
    headers = {
        "E2b-Sandbox-Id": sbx.sandbox_id,
        "E2b-Sandbox-Port": "49983",
        "X-Access-Token": sbx._envd_access_token or "",
    }
    return httpx.Client(base_url=server.url, headers=headers, timeout=30)


def test_raw_files_http(sbx: Sandbox, e2b_env: ServerProcess) -> None:
    name = _name()
    with _envd(sbx, e2b_env) as envd:
        r = envd.post("/files", params={"path": name}, files={"file": ("ignored", b"0123456789")})
        assert r.status_code == 200 and r.json() == [
            {"name": name, "path": f"/home/user/{name}", "type": "file"}
        ]
        r = envd.get("/files", params={"path": name}, headers={"Range": "bytes=2-5"})
        assert (r.status_code, r.content, r.headers["content-range"]) == (206, b"2345", "bytes 2-5/10")
        r = envd.get("/files", params={"path": name}, headers={"Range": "bytes=-3"})
        assert r.content == b"789"
        r = envd.get("/files", params={"path": name}, headers={"Range": "bytes=20-"})
        assert r.status_code == 416
        r = envd.get("/files", params={"path": name}, headers={"Accept-Encoding": "gzip"})
        assert r.headers["content-encoding"] == "gzip" and r.content == b"0123456789"  # httpx decodes
        body = gzip.compress(b"compressed body")
        r = envd.post("/files", params={"path": name + ".gz"}, content=body,
                      headers={"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"})  # fmt: skip
        assert r.status_code == 200 and sbx.files.read(name + ".gz") == "compressed body"
        r = envd.get("/files", params={"path": "/home/user"})
        assert r.status_code == 400
        r = envd.get("/files", params={"path": "missing-file"})
        assert r.status_code == 404 and r.json()["code"] == 404
        r = envd.get("/files", params={"path": name, "username": "no-such-user"})
        assert r.status_code == 401
        r = envd.get("/files", params={"path": name}, headers={"X-Access-Token": "wrong"})
        assert r.status_code == 401


async def test_async_flavour(sbx: Sandbox) -> None:
    asbx = await AsyncSandbox.connect(sbx.sandbox_id)
    d = _name("d")
    assert await asbx.files.make_dir(d) is True
    assert await asbx.files.make_dir(d) is False
    info = await asbx.files.write(f"{d}/a.txt", "async", metadata={"k": "v"})
    assert info.path == f"/home/user/{d}/a.txt" and info.metadata == {"k": "v"}
    assert await asbx.files.read(f"{d}/a.txt") == "async"
    assert (await asbx.files.get_info(f"{d}/a.txt")).size == 5
    await asbx.files.write(f"{d}/b.bin", io.BytesIO(b"streamed"))
    await asbx.files.write(f"{d}/c.bin", b"zipped", gzip=True)
    assert bytes(await asbx.files.read(f"{d}/c.bin", format="bytes", gzip=True)) == b"zipped"
    assert [e.name for e in await asbx.files.list(d)] == ["a.txt", "b.bin", "c.bin"]
    await asbx.files.rename(f"{d}/b.bin", f"{d}/d.bin")
    assert await asbx.files.exists(f"{d}/b.bin") is False
    await asbx.files.remove(d)
    with pytest.raises(FileNotFoundException):
        await asbx.files.get_info(d)

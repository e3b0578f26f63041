"""Entry info (pure helpers + confined readers) and the `filesystem.Filesystem` Connect service."""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.core.errors import InvalidArgument, NotFound
from corral.node.envd.confined import ConfinedRoot
from corral.node.envd.context import EnvdSandbox
from corral.node.envd.entry import (
    FileKind,
    go_mode_string,
    list_entries,
    read_entry,
    resolve_user_path,
    validate_metadata,
)
from corral.node.envd.filesystem import FilesystemService
from corral.spec._generated.filesystem.filesystem_connect import FilesystemASGIApplication
from corral.spec.envd import envd_codecs

PASSWD = "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/bash\n"
GROUP = "root:x:0:\nuser:x:1000:\n"


# -- pure helpers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "text"),
    [
        (stat.S_IFREG | 0o644, "-rw-r--r--"),
        (stat.S_IFDIR | 0o755, "drwxr-xr-x"),
        (stat.S_IFLNK | 0o777, "Lrwxrwxrwx"),
        (stat.S_IFDIR | stat.S_ISVTX | 0o777, "dtrwxrwxrwx"),
        (stat.S_IFREG | stat.S_ISUID | 0o755, "urwxr-xr-x"),
        (stat.S_IFREG | stat.S_ISGID | 0o2755 & 0o777, "grwxr-xr-x"),
        (stat.S_IFCHR | 0o666, "Dcrw-rw-rw-"),
        (stat.S_IFBLK | 0o660, "Drw-rw----"),
        (stat.S_IFIFO | 0o600, "prw-------"),
        (stat.S_IFSOCK | 0o755, "Srwxr-xr-x"),
        (stat.S_IFREG, "----------"),
    ],
)
def test_go_mode_string(mode: int, text: str) -> None:
    assert go_mode_string(mode) == text


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("", "/home/user"),
        ("x.txt", "/home/user/x.txt"),
        ("a/../b", "/home/user/b"),
        ("../../../etc", "/etc"),
        ("~", "/home/user"),
        ("~/x", "/home/user/x"),
        ("/abs//p/", "/abs/p"),
        ("/a/../../..", "/"),
    ],
)
def test_resolve_user_path(path: str, expected: str) -> None:
    assert resolve_user_path(path, "/home/user") == expected


def test_resolve_user_path_refuses_other_users_home_and_uses_workdir() -> None:
    with pytest.raises(InvalidArgument, match="cannot expand user-specific home dir"):
        resolve_user_path("~root/x", "/home/user")
    assert resolve_user_path("", "/home/user", workdir="/code") == "/code"


def test_validate_metadata_limits() -> None:
    validate_metadata({"a": "b", "k" * 246: ""})
    for bad in ({"": "v"}, {"k" * 247: "v"}, {"k": "\x01"}, {"k\n": "v"}, {"k": "é"}, {"k": "v" * 4100}):
        with pytest.raises(InvalidArgument):
            validate_metadata(bad)


# -- entries through a confined root ---------------------------------------------------------


@pytest.fixture
def sandbox_dir(tmp_path: Path) -> Path:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text(PASSWD)
    (tmp_path / "etc" / "group").write_text(GROUP)
    home = tmp_path / "home" / "user"
    home.mkdir(parents=True)
    os.chown(home, 1000, 1000)
    (home / "hello.txt").write_text("hello")
    os.chown(home / "hello.txt", 1000, 1000)
    os.chmod(home / "hello.txt", 0o644)
    (home / "b" / "c").mkdir(parents=True)
    (home / "b" / "c" / "deep.txt").write_text("x")
    (home / "B").mkdir()
    (home / "a.txt").write_text("a")
    os.symlink("/home/user/hello.txt", home / "link")
    os.symlink("/nowhere", home / "broken")
    os.symlink("/home/user/b", home / "dirlink")
    os.setxattr(home / "hello.txt", "user.e2b.owner-team", b"red")
    os.setxattr(home / "hello.txt", "user.other", b"ignored")
    return tmp_path


@pytest.fixture
def root(sandbox_dir: Path) -> ConfinedRoot:
    with ConfinedRoot.open_path(str(sandbox_dir)) as r:
        yield r


def test_read_entry_file(root: ConfinedRoot) -> None:
    entry = read_entry(root, "/home/user/hello.txt")
    assert (entry.name, entry.type, entry.path, entry.size) == (
        "hello.txt",
        FileKind.FILE,
        "/home/user/hello.txt",
        5,
    )
    assert (entry.mode, entry.permissions, entry.owner, entry.group) == (0o644, "-rw-r--r--", "user", "user")
    assert entry.modified_ns > 0 and entry.symlink_target is None
    assert entry.metadata == {"owner-team": "red"}


def test_read_entry_symlink_takes_type_and_mode_from_target(root: ConfinedRoot) -> None:
    entry = read_entry(root, "/home/user/link")
    assert (entry.type, entry.mode, entry.permissions) == (FileKind.FILE, 0o644, "Lrwxrwxrwx")
    assert entry.symlink_target == "/home/user/hello.txt"
    assert entry.size == len("/home/user/hello.txt")
    assert entry.metadata == {"owner-team": "red"}
    assert read_entry(root, "/home/user/dirlink").type is FileKind.DIRECTORY


def test_read_entry_broken_symlink(root: ConfinedRoot) -> None:
    entry = read_entry(root, "/home/user/broken")
    assert (entry.type, entry.mode, entry.symlink_target) == (FileKind.UNSPECIFIED, 0, "/home/user/broken")


def test_read_entry_unknown_owner_is_numeric(root: ConfinedRoot, sandbox_dir: Path) -> None:
    os.chown(sandbox_dir / "home" / "user" / "a.txt", 4321, 8765)
    entry = read_entry(root, "/home/user/a.txt")
    assert (entry.owner, entry.group) == ("4321", "8765")


def test_list_entries_walks_in_lexical_preorder(root: ConfinedRoot) -> None:
    names = [e.path for e in list_entries(root, "/home/user", 1)]
    assert names == [f"/home/user/{n}" for n in ("B", "a.txt", "b", "broken", "dirlink", "hello.txt", "link")]
    deep = [e.path for e in list_entries(root, "/home/user", 3)]
    assert deep == [
        "/home/user/B",
        "/home/user/a.txt",
        "/home/user/b",
        "/home/user/b/c",
        "/home/user/b/c/deep.txt",
        "/home/user/broken",
        "/home/user/dirlink",  # a symlinked dir is listed, not descended into
        "/home/user/hello.txt",
        "/home/user/link",
    ]
    assert [e.path for e in list_entries(root, "/home/user/b", 0)] == ["/home/user/b/c"]
    # A symlink to a directory lists the target, under its resolved path.
    assert [e.path for e in list_entries(root, "/home/user/dirlink", 1)] == ["/home/user/b/c"]


def test_list_entries_errors(root: ConfinedRoot) -> None:
    with pytest.raises(NotFound):
        list_entries(root, "/home/user/missing", 1)
    with pytest.raises(InvalidArgument, match="not a directory"):
        list_entries(root, "/home/user/hello.txt", 1)


# -- the Connect service ---------------------------------------------------------------------


@pytest.fixture
async def client(root: ConfinedRoot) -> AsyncIterator[httpx.AsyncClient]:
    sandbox = EnvdSandbox(
        sandbox_id="sbx1",
        template_id="base",
        access_token=None,
        env_vars={},
        root=root,
        spawner=None,  # type: ignore[arg-type]
        processes=None,  # type: ignore[arg-type]
    )
    seen: list[Mapping[str, str]] = []

    def lookup(headers: Mapping[str, str]) -> EnvdSandbox:
        seen.append(headers)
        if headers.get("e2b-sandbox-id") != "sbx1":
            raise NotFound("sandbox not found")
        return sandbox

    app = FilesystemASGIApplication(FilesystemService(lookup), codecs=envd_codecs())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://envd", headers={"e2b-sandbox-id": "sbx1"}
    ) as c:
        yield c


async def call(
    client: httpx.AsyncClient, method: str, body: dict[str, Any], user: str | None = None
) -> httpx.Response:
    headers = {"content-type": "application/json", "connect-protocol-version": "1"}
    if user is not None:
        headers["authorization"] = "Basic " + base64.b64encode(f"{user}:".encode()).decode()
    return await client.post(f"/filesystem.Filesystem/{method}", json=body, headers=headers)


async def test_stat_relative_path_as_default_user(client: httpx.AsyncClient) -> None:
    r = await call(client, "Stat", {"path": "hello.txt"})
    assert r.status_code == 200, r.text
    entry = r.json()["entry"]
    assert entry["path"] == "/home/user/hello.txt" and entry["name"] == "hello.txt"
    assert entry["type"] == "FILE_TYPE_FILE" and entry["size"] == "5" and entry["mode"] == 0o644
    assert entry["permissions"] == "-rw-r--r--" and entry["owner"] == "user" and entry["group"] == "user"
    assert entry["modifiedTime"].endswith("Z") and "symlinkTarget" not in entry
    assert entry["metadata"] == {"owner-team": "red"}


async def test_stat_symlink_and_broken_symlink(client: httpx.AsyncClient) -> None:
    entry = (await call(client, "Stat", {"path": "/home/user/link"})).json()["entry"]
    assert entry["type"] == "FILE_TYPE_FILE" and entry["symlinkTarget"] == "/home/user/hello.txt"
    assert entry["permissions"] == "Lrwxrwxrwx"
    broken = (await call(client, "Stat", {"path": "broken"})).json()["entry"]
    assert "type" not in broken and broken["symlinkTarget"] == "/home/user/broken"


async def test_stat_missing_is_not_found(client: httpx.AsyncClient) -> None:
    r = await call(client, "Stat", {"path": "/nope"})
    assert r.status_code == 404 and r.json() == {
        "code": "not_found",
        "message": "path '/nope' does not exist",
    }


async def test_unknown_user_and_unknown_sandbox(client: httpx.AsyncClient) -> None:
    r = await call(client, "Stat", {"path": "/"}, user="nobody")
    assert r.status_code == 401 and r.json() == {
        "code": "unauthenticated",
        "message": "invalid username: 'nobody'",
    }
    r = await client.post(
        "/filesystem.Filesystem/Stat",
        json={"path": "/"},
        headers={"content-type": "application/json", "e2b-sandbox-id": "other"},
    )
    assert r.status_code == 404


async def test_make_dir(client: httpx.AsyncClient, sandbox_dir: Path) -> None:
    r = await call(client, "MakeDir", {"path": "new/nested"})
    assert r.status_code == 200, r.text
    assert r.json()["entry"]["path"] == "/home/user/new/nested"
    for path in ("home/user/new", "home/user/new/nested"):
        st = (sandbox_dir / path).stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, 1000, 1000)
    r = await call(client, "MakeDir", {"path": "new/nested"})
    assert r.status_code == 409 and r.json()["code"] == "already_exists"
    r = await call(client, "MakeDir", {"path": "hello.txt"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument"
    r = await call(client, "MakeDir", {"path": "/rootdir"}, user="root")
    assert r.status_code == 200 and (sandbox_dir / "rootdir").stat().st_uid == 0


async def test_list_dir(client: httpx.AsyncClient) -> None:
    r = await call(client, "ListDir", {"path": "/home/user"})  # depth omitted (0) means 1
    names = [e["name"] for e in r.json()["entries"]]
    assert names == ["B", "a.txt", "b", "broken", "dirlink", "hello.txt", "link"]
    r = await call(client, "ListDir", {"path": "/home/user/b", "depth": 2})
    assert [e["path"] for e in r.json()["entries"]] == ["/home/user/b/c", "/home/user/b/c/deep.txt"]
    assert (await call(client, "ListDir", {"path": "/missing"})).status_code == 404
    assert (await call(client, "ListDir", {"path": "hello.txt"})).json()["code"] == "invalid_argument"


async def test_move(client: httpx.AsyncClient, sandbox_dir: Path) -> None:
    r = await call(client, "Move", {"source": "a.txt", "destination": "moved/into/a2.txt"})
    assert r.status_code == 200, r.text
    assert r.json()["entry"]["path"] == "/home/user/moved/into/a2.txt"
    assert (sandbox_dir / "home/user/moved/into/a2.txt").read_text() == "a"
    assert (sandbox_dir / "home/user/moved").stat().st_uid == 1000
    r = await call(client, "Move", {"source": "a.txt", "destination": "x"})
    assert r.status_code == 404


async def test_remove(client: httpx.AsyncClient, sandbox_dir: Path) -> None:
    assert (await call(client, "Remove", {"path": "b"})).status_code == 200
    assert not (sandbox_dir / "home/user/b").exists()
    assert (await call(client, "Remove", {"path": "does-not-exist"})).status_code == 200
    assert (await call(client, "Remove", {"path": "link"})).status_code == 200
    assert (sandbox_dir / "home/user/hello.txt").exists()

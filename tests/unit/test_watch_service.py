"""The watcher RPCs of `filesystem.Filesystem` over ASGI (the polling trio; WatchDir streaming is
covered by the compat tests against the real server, as an ASGI transport buffers whole bodies)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.core.errors import NotFound
from corral.node.envd.confined import ConfinedRoot
from corral.node.envd.context import EnvdSandbox
from corral.node.envd.filesystem import FilesystemService, keepalive_seconds
from corral.spec._generated.filesystem.filesystem_connect import FilesystemASGIApplication
from corral.spec.envd import envd_codecs

PASSWD = "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/bash\n"
GROUP = "root:x:0:\nuser:x:1000:\n"


@pytest.fixture
def sandbox_dir(tmp_path: Path) -> Path:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text(PASSWD)
    (tmp_path / "etc/group").write_text(GROUP)
    (tmp_path / "home/user/dir").mkdir(parents=True)
    (tmp_path / "home/user/file").write_text("x")
    return tmp_path


@pytest.fixture
async def setup(sandbox_dir: Path) -> AsyncIterator[tuple[httpx.AsyncClient, EnvdSandbox]]:
    with ConfinedRoot.open_path(str(sandbox_dir)) as root:
        sandbox = EnvdSandbox(
            sandbox_id="sbx1",
            template_id="base",
            access_token=None,
            env_vars={},
            root=root,
            spawner=None,  # type: ignore[arg-type]
            processes=None,  # type: ignore[arg-type]
        )

        def lookup(headers: Mapping[str, str]) -> EnvdSandbox:
            if headers.get("e2b-sandbox-id") != "sbx1":
                raise NotFound("sandbox not found")
            return sandbox

        service = FilesystemService(lookup)
        app = FilesystemASGIApplication(service, codecs=envd_codecs())
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://envd", headers={"e2b-sandbox-id": "sbx1"}
        ) as client:
            yield client, sandbox
        sandbox.watchers.close()
        service.close()


async def call(client: httpx.AsyncClient, method: str, body: dict[str, Any]) -> httpx.Response:
    headers = {"content-type": "application/json", "connect-protocol-version": "1"}
    return await client.post(f"/filesystem.Filesystem/{method}", json=body, headers=headers)


async def test_polling_watcher_trio(setup: tuple[httpx.AsyncClient, EnvdSandbox], sandbox_dir: Path) -> None:
    client, sandbox = setup
    r = await call(client, "CreateWatcher", {"path": "dir", "includeEntry": True})
    assert r.status_code == 200, r.text
    watcher_id = r.json()["watcherId"]
    assert watcher_id.startswith("w")
    (sandbox_dir / "home/user/dir/new").write_text("hello")
    events = (await call(client, "GetWatcherEvents", {"watcherId": watcher_id})).json()["events"]
    assert [(e["name"], e["type"]) for e in events] == [
        ("new", "EVENT_TYPE_CREATE"),
        ("new", "EVENT_TYPE_WRITE"),
    ]
    entry = events[1]["entry"]
    assert (
        entry["path"] == "/home/user/dir/new" and entry["type"] == "FILE_TYPE_FILE" and entry["size"] == "5"
    )
    assert (await call(client, "GetWatcherEvents", {"watcherId": watcher_id})).json() == {}
    os.unlink(sandbox_dir / "home/user/dir/new")
    events = (await call(client, "GetWatcherEvents", {"watcherId": watcher_id})).json()["events"]
    assert events == [{"name": "new", "type": "EVENT_TYPE_REMOVE"}]  # no entry for REMOVE
    assert (await call(client, "RemoveWatcher", {"watcherId": watcher_id})).status_code == 200
    r = await call(client, "GetWatcherEvents", {"watcherId": watcher_id})
    assert r.status_code == 404 and r.json()["message"] == f"watcher with id {watcher_id} not found"
    assert len(sandbox.watchers) == 0


async def test_watcher_errors(setup: tuple[httpx.AsyncClient, EnvdSandbox]) -> None:
    client, _ = setup
    r = await call(client, "CreateWatcher", {"path": "missing"})
    assert r.status_code == 404 and r.json() == {
        "code": "not_found",
        "message": "path /home/user/missing not found",
    }
    r = await call(client, "CreateWatcher", {"path": "file"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument"
    assert (await call(client, "RemoveWatcher", {"watcherId": "wnope"})).status_code == 404


def test_keepalive_seconds() -> None:
    assert keepalive_seconds({"keepalive-ping-interval": "50"}) == 50
    assert keepalive_seconds({}) == 90
    assert keepalive_seconds({"keepalive-ping-interval": "x"}) == 90
    assert keepalive_seconds({"keepalive-ping-interval": "0"}) == 1

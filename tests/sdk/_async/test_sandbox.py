"""Sandbox lifecycle through the SDK against a real server: create, info, list, timeouts, kill,
connect, by-id class methods, URLs and the error hierarchy."""

from __future__ import annotations

import datetime as dt
import time

import httpx
import pytest

from corral import (
    AsyncSandbox,
    AuthenticationException,
    ConnectionException,
    NotFoundException,
    NotSupportedException,
    SandboxException,
    SandboxNotFoundException,
    SandboxQuery,
    SandboxState,
)
from corral.sdk._handlers import asleep
from tests.conftest import ServerProcess

pytestmark = pytest.mark.integration


async def test_create_info_envs_and_kill(sdk_env: ServerProcess, tag: str) -> None:
    sbx = await AsyncSandbox.create(timeout=60, metadata={"tag": tag}, envs={"GREETING": "hi there"})
    try:
        info = await sbx.get_info()
        assert (info.sandbox_id, info.template_id, info.state) == (
            sbx.sandbox_id,
            "base",
            SandboxState.RUNNING,
        )
        assert info.metadata == {"tag": tag}
        assert 55 <= (info.end_at - info.started_at).total_seconds() <= 65
        assert (await sbx.commands.run("echo $GREETING")).stdout == "hi there\n"
        assert await sbx.is_running()
        assert await sbx.kill() is True
        assert await sbx.is_running() is False
        assert await sbx.kill() is False
        assert await AsyncSandbox.kill(sbx.sandbox_id) is False
        with pytest.raises(SandboxNotFoundException, match=sbx.sandbox_id):
            await AsyncSandbox.get_info(sbx.sandbox_id)
    finally:
        await sbx.aclose()


async def test_context_manager_kills_the_sandbox(sdk_env: ServerProcess) -> None:
    async with await AsyncSandbox.create(timeout=60) as sbx:
        assert (await sbx.commands.run("true")).exit_code == 0
    with pytest.raises(NotFoundException):
        await AsyncSandbox.get_info(sbx.sandbox_id)


async def test_list_pages_and_filters(sdk_env: ServerProcess, tag: str) -> None:
    older = await AsyncSandbox.create(timeout=60, metadata={"tag": tag, "n": "1"})
    newer = await AsyncSandbox.create(timeout=60, metadata={"tag": tag, "n": "2"})
    try:
        paginator = AsyncSandbox.list(query=SandboxQuery(metadata={"tag": tag}), limit=1)
        assert paginator.has_next
        first = await paginator.next_items()
        assert [info.sandbox_id for info in first] == [newer.sandbox_id]
        assert paginator.has_next and paginator.next_token
        second = await paginator.next_items()
        assert [info.sandbox_id for info in second] == [older.sandbox_id]
        assert not paginator.has_next
        with pytest.raises(SandboxException):
            await paginator.next_items()
        every = [
            info.sandbox_id
            async for info in AsyncSandbox.list(query=SandboxQuery(metadata={"tag": tag}), order="asc")
        ]
        assert every == [older.sandbox_id, newer.sandbox_id]
        only_two = [
            info.sandbox_id
            async for info in AsyncSandbox.list(query=SandboxQuery(metadata={"tag": tag, "n": "2"}))
        ]
        assert only_two == [newer.sandbox_id]
    finally:
        await older.kill()
        await newer.kill()
        await older.aclose()
        await newer.aclose()


async def test_set_timeout_ends_the_sandbox(sandbox: AsyncSandbox) -> None:
    await sandbox.set_timeout(1)
    deadline = time.monotonic() + 15
    while await sandbox.is_running():
        assert time.monotonic() < deadline, "the sandbox outlived its timeout"
        await asleep(0.2)
    with pytest.raises(SandboxNotFoundException):
        await sandbox.set_timeout(10)


async def test_connect_and_class_methods(sandbox: AsyncSandbox) -> None:
    before = await AsyncSandbox.get_info(sandbox.sandbox_id)
    again = await AsyncSandbox.connect(sandbox.sandbox_id, timeout=0)
    try:
        assert again.sandbox_id == sandbox.sandbox_id
        assert (await again.commands.run("hostname")).stdout.strip() == sandbox.sandbox_id
        assert (
            await AsyncSandbox.get_info(sandbox.sandbox_id)
        ).end_at == before.end_at  # timeout 0 never shortens
        await AsyncSandbox.set_timeout(sandbox.sandbox_id, 90)
        remaining = ((await sandbox.get_info()).end_at - dt.datetime.now(dt.UTC)).total_seconds()
        assert 80 <= remaining <= 91
    finally:
        await again.aclose()
    with pytest.raises(SandboxNotFoundException, match="nosuchsandbox"):
        await AsyncSandbox.connect("nosuchsandbox")


async def test_pause_and_metrics_succeed_or_say_unsupported(sandbox: AsyncSandbox) -> None:
    try:
        assert await sandbox.pause() is True
    except NotSupportedException as exc:
        assert "not supported" in str(exc)
    else:
        assert (await sandbox.get_info()).state == SandboxState.PAUSED
        assert await sandbox.pause() is False
    try:
        samples = await AsyncSandbox.get_metrics(sandbox.sandbox_id)
    except NotSupportedException as exc:
        assert "not supported" in str(exc) or "not an endpoint" in str(exc)
    else:
        assert all(sample.cpu_count > 0 for sample in samples)


async def test_get_host_reaches_a_sandbox_port(sandbox: AsyncSandbox, sdk_env: ServerProcess) -> None:
    await sandbox.files.write("/tmp/www/index.html", "served from the sandbox")
    await sandbox.commands.run("cd /tmp/www && python3 -m http.server 8080", background=True, timeout=0)
    host = sandbox.get_host(8080)
    assert host == f"8080-{sandbox.sandbox_id}.{sandbox.sandbox_domain}:{sdk_env.port}"
    deadline = time.monotonic() + 15
    async with httpx.AsyncClient() as client:
        while True:
            response = await client.get(f"{sdk_env.url}/index.html", headers={"host": host})
            if response.status_code == 200 or time.monotonic() > deadline:
                break
            await asleep(0.2)
    assert response.text == "served from the sandbox"


async def test_signed_download_and_upload_urls(sandbox: AsyncSandbox) -> None:
    await sandbox.files.write("/tmp/signed.txt", "signed content")
    async with httpx.AsyncClient() as client:  # no sandbox headers, no token: the signature is enough
        download = await client.get(sandbox.download_url("/tmp/signed.txt"))
        assert (download.status_code, download.text) == (200, "signed content")
        upload = await client.post(
            sandbox.upload_url("/tmp/uploaded.txt"), files={"file": ("uploaded.txt", b"up")}
        )
        assert upload.status_code == 200, upload.text
        expired = await client.get(sandbox.download_url("/tmp/signed.txt", use_signature_expiration=-10))
        assert (expired.status_code, expired.json()) == (
            401,
            {"code": 401, "message": "signature is already expired"},
        )
    assert await sandbox.files.read("/tmp/uploaded.txt") == "up"


async def test_errors_say_what_went_wrong(sdk_env: ServerProcess) -> None:
    with pytest.raises(AuthenticationException, match="API key"):
        await AsyncSandbox.create(api_key="e2b_" + "0" * 40)
    with pytest.raises(ConnectionException, match="Corral server running"):
        await AsyncSandbox.create(api_url="http://127.0.0.1:9", request_timeout=5)
    with pytest.raises(SandboxNotFoundException):
        await AsyncSandbox.get_info("doesnotexist")
    with pytest.raises(SandboxException, match="no-such-template"):
        await AsyncSandbox.create("no-such-template")

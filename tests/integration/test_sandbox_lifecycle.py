"""Real sandboxes through a real server: nothing is left behind, sandboxes are isolated, a restart
re-adopts running sandboxes, and bad input gets clear errors."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox

from corral.node.network.naming import veth_name
from tests.conftest import TEST_BRIDGE, TEST_HOME, ServerProcess

pytestmark = pytest.mark.integration


def _host_traces(sandbox_id: str) -> list[str]:
    """Everything a sandbox may leave on the host, as human-readable findings."""
    found = []
    mounts = Path("/proc/self/mountinfo").read_text()
    if sandbox_id in mounts:
        found.append("mount")
    for controller in ("memory", "pids", "cpu", "freezer"):
        if (Path("/sys/fs/cgroup") / controller / f"corral-{TEST_BRIDGE}" / sandbox_id).exists():
            found.append(f"cgroup {controller}")
    netns = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout
    if sandbox_id in netns:
        found.append("netns")
    if (TEST_HOME / "sandboxes" / sandbox_id).exists():
        found.append("sandbox dir")
    runtime = os.environ.get("CORRAL_RUNTIME", "crun")  # the test server's (runsc: `make test`'s second pass)
    containers = subprocess.run([runtime, "--root", str(TEST_HOME / "runtime"), "list", "--quiet"], check=False, capture_output=True, text=True).stdout
    if sandbox_id in containers.split():
        found.append("container")
    ps = subprocess.run(["ps", "-eo", "args"], check=False, capture_output=True, text=True).stdout
    if sandbox_id in ps:
        found.append("process")
    return found


def test_kill_leaves_nothing_behind(e2b_env: ServerProcess) -> None:
    sbx = Sandbox.create(timeout=60)
    assert sbx.commands.run("echo hi").stdout == "hi\n"
    assert "container" in _host_traces(sbx.sandbox_id)
    veths_before = subprocess.run(["ip", "-o", "link", "show", "master", TEST_BRIDGE], check=False, capture_output=True, text=True).stdout
    sbx.kill()
    # Teardown finishes in the background after the API answered; it must finish, and soon.
    deadline = time.monotonic() + 10
    while _host_traces(sbx.sandbox_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _host_traces(sbx.sandbox_id) == []
    veths_after = subprocess.run(["ip", "-o", "link", "show", "master", TEST_BRIDGE], check=False, capture_output=True, text=True).stdout
    # Its own port is gone (counting ports would race with the warm pool booting a replacement).
    veth = veth_name(TEST_BRIDGE, sbx.sandbox_id)
    assert f" {veth}@" in veths_before and f" {veth}@" not in veths_after


def test_sandboxes_are_isolated(e2b_env: ServerProcess) -> None:
    a = Sandbox.create(timeout=60)
    b = Sandbox.create(timeout=60)
    try:
        a.commands.run("echo secret-a > /tmp/mine; sleep 300", background=True)
        deadline = time.monotonic() + 15  # the shell runs sleep when it gets to it (later under load)
        while "sleep 300" not in a.commands.run("ps -eo args").stdout and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "sleep 300" not in b.commands.run("ps -eo args").stdout
        assert "sleep 300" in a.commands.run("ps -eo args").stdout
        assert b.commands.run("cat /tmp/mine 2>&1 || true").stdout.startswith("cat: /tmp/mine: No such file")
        assert a.commands.run("hostname").stdout.strip() == a.sandbox_id
        ip_b = b.commands.run("hostname -I").stdout.split()[0]
        reach = a.commands.run(f"timeout 2 bash -c 'echo > /dev/tcp/{ip_b}/22' 2>&1; echo rc=$?").stdout
        assert "rc=0" not in reach
    finally:
        a.kill()
        b.kill()


def test_restart_readopts_running_sandbox(e2b_env: ServerProcess) -> None:
    sbx = Sandbox.create(timeout=120)
    try:
        sbx.files.write("/tmp/before-restart", "still here")
        sbx.commands.run("sleep 1000", background=True)
        e2b_env.restart(signal.SIGKILL)
        same = Sandbox.connect(sbx.sandbox_id)
        assert same.files.read("/tmp/before-restart") == "still here"
        assert "sleep 1000" in same.commands.run("ps -eo args").stdout
        assert same.commands.run("echo alive").stdout == "alive\n"
    finally:
        sbx.kill()


def test_client_disconnect_does_not_kill_command(e2b_env: ServerProcess) -> None:
    sbx = Sandbox.create(timeout=60)
    try:
        handle = sbx.commands.run("sleep 2; echo done > /tmp/finished", background=True)
        handle.disconnect()
        deadline = time.monotonic() + 20  # 2 s of sleep, however loaded the machine
        while time.monotonic() < deadline and not (
            sbx.files.exists("/tmp/finished") and sbx.files.read("/tmp/finished") == "done\n"
        ):
            time.sleep(0.1)
        assert sbx.files.read("/tmp/finished") == "done\n"
    finally:
        sbx.kill()


def test_bad_input_gets_clear_errors(e2b_env: ServerProcess) -> None:
    with e2b_env.api() as api:
        r = api.post("/sandboxes", json={"templateID": "no-such-template"})
        assert r.status_code in (400, 404) and "no-such-template" in r.json()["message"]
        r = api.get("/sandboxes/doesnotexist")
        assert r.status_code == 404 and r.json()["code"] == 404
        r = api.post("/sandboxes", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400
    for headers in ({}, {"X-API-Key": "e2b_" + "0" * 40}):
        r = httpx.get(f"{e2b_env.url}/v2/sandboxes", headers=headers)
        assert r.status_code == 401 and r.json()["code"] == 401
    r = httpx.get(f"{e2b_env.url}/health", headers={"E2b-Sandbox-Id": "doesnotexist", "E2b-Sandbox-Port": "49983"})
    assert r.status_code == 502
    assert r.json() == {"sandboxId": "doesnotexist", "message": "The sandbox was not found", "code": 502}


def test_envd_requires_access_token(e2b_env: ServerProcess) -> None:
    sbx = Sandbox.create(timeout=60)
    try:
        headers = {
            "E2b-Sandbox-Id": sbx.sandbox_id,
            "E2b-Sandbox-Port": "49983",
            "Content-Type": "application/json",
        }
        r = httpx.post(f"{e2b_env.url}/process.Process/List", headers=headers, content=b"{}")
        assert r.status_code == 401
        r = httpx.post(
            f"{e2b_env.url}/process.Process/List",
            headers=headers | {"X-Access-Token": "wrong"},
            content=b"{}",
        )
        assert r.status_code == 401
        assert httpx.get(f"{e2b_env.url}/health", headers=headers).status_code == 204
    finally:
        sbx.kill()


def test_package_installs_work_inside_a_sandbox(e2b_env: ServerProcess) -> None:
    """Names resolve through the bridge's DNS forwarder, egress is NATed, and the host's extra CAs
    (TLS-inspecting proxies) are trusted, so pip and npm work as on the host."""
    sbx = Sandbox.create(timeout=120)
    try:
        out = sbx.commands.run(
            "pip install --user --no-cache-dir --force-reinstall six 2>&1 | tail -1 && npm view is-number version",
            timeout=110,
        ).stdout
        assert "Successfully installed six" in out
        assert out.strip().splitlines()[-1][0].isdigit()
    finally:
        sbx.kill()

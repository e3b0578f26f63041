"""Pause, resume, timeouts that pause, auto-resume, snapshots, forks, metrics and logs, driven by the
official e2b SDK against a real server (e2b-protocol.md §2.1, §2.2, §6 items 5, 7, 10-13, 25-27)."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from e2b import Sandbox, SandboxQuery, SandboxState
from e2b.exceptions import NotFoundException, SandboxException, SandboxNotFoundException

pytestmark = pytest.mark.compat

# Read with a command: on gVisor /proc lives in the Sentry, where envd's file API does not reach.
BOOT_ID = "/proc/sys/kernel/random/boot_id"


LISTENING_8000 = "for i in $(seq 300); do curl -s -o /dev/null http://127.0.0.1:8000/ && exit; sleep 0.1; done; exit 1"


def _wait(predicate, timeout: float = 15.0, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def _health(server, sandbox_id: str) -> int:
    headers = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": "49983"}
    return httpx.get(f"{server.url}/health", headers=headers, timeout=5).status_code


# -- pause and resume ------------------------------------------------------------------------------


def test_pause_keeps_processes_memory_and_files(sandbox: Sandbox, e2b_env) -> None:
    sandbox.files.write("/home/user/before.txt", "kept")
    boot = sandbox.commands.run(f"cat {BOOT_ID}").stdout
    counter = sandbox.commands.run(
        "i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done", background=True
    )
    assert _wait(lambda: sandbox.files.exists("/tmp/count"))

    assert sandbox.pause() is True
    assert not sandbox.is_running()
    assert _health(e2b_env, sandbox.sandbox_id) == 502
    assert Sandbox.get_info(sandbox.sandbox_id).state == SandboxState.PAUSED
    assert sandbox.pause() is False  # 409: already paused
    # Frozen: the loop does not advance while paused (its file is readable from the host side).
    frozen_at = e2b_env_home_read(sandbox.sandbox_id, "/tmp/count")
    time.sleep(0.4)
    assert e2b_env_home_read(sandbox.sandbox_id, "/tmp/count") == frozen_at

    token = sandbox._envd_access_token
    resumed = sandbox.connect()
    assert resumed.sandbox_id == sandbox.sandbox_id
    assert resumed._envd_access_token == token
    assert resumed.is_running()
    assert resumed.files.read("/home/user/before.txt") == "kept"
    assert resumed.commands.run(f"cat {BOOT_ID}").stdout == boot  # memory kept: the same boot
    assert counter.pid in {p.pid for p in resumed.commands.list()}
    assert _wait(lambda: resumed.files.read("/tmp/count") != frozen_at)


def e2b_env_home_read(sandbox_id: str, path: str) -> str:
    """A file of a sandbox read on the host through its rootfs mount (works while it is frozen)."""
    from tests.conftest import TEST_HOME

    return (TEST_HOME / "sandboxes" / sandbox_id / "rootfs" / path.lstrip("/")).read_text()


def test_pause_without_memory_cold_boots_and_keeps_files(sandbox: Sandbox, e2b_env) -> None:
    sandbox.files.write("/home/user/fs-only-marker.txt", "persisted")
    boot = sandbox.commands.run(f"cat {BOOT_ID}").stdout.strip()
    sandbox.commands.run("sleep 1000", background=True)

    assert sandbox.pause(keep_memory=False) is True
    assert not sandbox.is_running()
    assert Sandbox.get_info(sandbox.sandbox_id).state == SandboxState.PAUSED
    assert sandbox.pause(keep_memory=False) is False

    resumed = sandbox.connect()
    assert resumed.is_running()
    assert resumed.files.read("/home/user/fs-only-marker.txt") == "persisted"
    assert resumed.commands.run(f"cat {BOOT_ID}").stdout.strip() != boot
    assert "sleep 1000" not in resumed.commands.run("ps -eo args").stdout
    assert resumed.commands.run("whoami").stdout == "user\n"


def test_connect_on_running_only_extends(sandbox: Sandbox) -> None:
    end = Sandbox.get_info(sandbox.sandbox_id).end_at
    Sandbox.connect(sandbox.sandbox_id, timeout=10)  # shorter than what is left: no change
    assert Sandbox.get_info(sandbox.sandbox_id).end_at == end
    Sandbox.connect(sandbox.sandbox_id, timeout=3600)
    assert Sandbox.get_info(sandbox.sandbox_id).end_at > end + timedelta(minutes=50)


def test_paused_sandboxes_are_listed_and_filtered(e2b_env) -> None:
    tag = uuid.uuid4().hex
    a = Sandbox.create(metadata={"suite": tag}, timeout=60)
    b = Sandbox.create(metadata={"suite": tag}, timeout=60)
    try:
        b.pause()

        def ids(*states: SandboxState) -> set[str]:
            query = SandboxQuery(metadata={"suite": tag}, state=list(states) if states else None)
            return {s.sandbox_id for s in Sandbox.list(query=query).next_items()}

        assert ids() == {a.sandbox_id, b.sandbox_id}
        assert ids(SandboxState.RUNNING) == {a.sandbox_id}
        assert ids(SandboxState.PAUSED) == {b.sandbox_id}
        assert Sandbox.kill(b.sandbox_id) is True  # a paused sandbox can be killed
        assert ids() == {a.sandbox_id}
    finally:
        a.kill()
        b.kill()


def test_unknown_sandbox_is_404_everywhere(e2b_env) -> None:
    for call in (
        lambda: Sandbox.connect("doesnotexist"),
        lambda: Sandbox.pause("doesnotexist"),  # type: ignore[call-arg]
        lambda: Sandbox.fork("doesnotexist"),
        lambda: Sandbox.create_snapshot("doesnotexist"),
        lambda: Sandbox.get_metrics("doesnotexist"),  # type: ignore[call-arg]
    ):
        with pytest.raises((SandboxNotFoundException, NotFoundException)):
            call()


# -- timeouts ----------------------------------------------------------------------------------------


def test_timeout_pauses_when_asked_and_keeps_memory(e2b_env) -> None:
    sbx = Sandbox.create(timeout=60, lifecycle={"on_timeout": {"action": "pause", "keep_memory": None}})  # type: ignore[typeddict-item]
    try:
        info = sbx.get_info()
        assert info.lifecycle == {"on_timeout": "pause", "auto_resume": False}
        boot = sbx.commands.run(f"cat {BOOT_ID}").stdout
        sbx.set_timeout(0)  # the timeout auto-pause happens now
        assert _wait(lambda: not sbx.is_running())
        assert sbx.get_info().state == SandboxState.PAUSED
        resumed = sbx.connect()
        assert resumed.commands.run(f"cat {BOOT_ID}").stdout == boot
    finally:
        sbx.kill()


def test_timeout_pause_without_memory_reboots(e2b_env) -> None:
    sbx = Sandbox.create(timeout=2, lifecycle={"on_timeout": {"action": "pause", "keep_memory": False}})
    try:
        sbx.files.write("/home/user/auto-pause-marker.txt", "marker")
        boot = sbx.commands.run(f"cat {BOOT_ID}").stdout
        assert _wait(lambda: Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED, timeout=10)
        resumed = sbx.connect()
        assert resumed.files.read("/home/user/auto-pause-marker.txt") == "marker"
        assert resumed.commands.run(f"cat {BOOT_ID}").stdout != boot
    finally:
        sbx.kill()


def test_paused_sandbox_does_not_expire_and_health_does_not_wake_it(e2b_env) -> None:
    sbx = Sandbox.create(timeout=1, lifecycle={"on_timeout": "pause", "auto_resume": True})
    try:
        assert _wait(lambda: Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED, timeout=10)
        time.sleep(1.5)  # well past its end: paused sandboxes stay
        assert not sbx.is_running()  # /health answers 502 and does not resume it
        assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED
    finally:
        sbx.kill()


def test_timeout_pause_without_auto_resume_needs_connect(e2b_env) -> None:
    sbx = Sandbox.create(timeout=60, lifecycle={"on_timeout": "pause", "auto_resume": False})
    try:
        sbx.commands.run("python3 -m http.server 8000 >/dev/null 2>&1", background=True)
        sbx.commands.run(LISTENING_8000)  # serving before the pause, however loaded the machine
        sbx.set_timeout(1)
        assert _wait(lambda: Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED, timeout=10)
        r = httpx.get(f"{e2b_env.url}/", headers={"Host": f"8000-{sbx.sandbox_id}.localhost"}, timeout=10)
        assert r.status_code == 502
        assert sbx.get_info().state == SandboxState.PAUSED
        sbx.connect()
        assert sbx.get_info().state == SandboxState.RUNNING and sbx.is_running()
    finally:
        sbx.kill()


def test_auto_resume_wakes_on_http_request(e2b_env) -> None:
    sbx = Sandbox.create(timeout=60, lifecycle={"on_timeout": "pause", "auto_resume": True})
    try:
        assert sbx.get_info().lifecycle == {"on_timeout": "pause", "auto_resume": True}
        sbx.commands.run("python3 -m http.server 8000 >/dev/null 2>&1", background=True)
        sbx.commands.run(LISTENING_8000)  # so the pause below finds it serving, however loaded the machine
        sbx.set_timeout(1)
        assert _wait(lambda: Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED, timeout=10)
        r = httpx.get(f"{e2b_env.url}/", headers={"Host": f"8000-{sbx.sandbox_id}.localhost"}, timeout=15)
        assert r.status_code == 200 and "Directory listing" in r.text
        assert sbx.get_info().state == SandboxState.RUNNING
        assert sbx.is_running()
        # envd traffic wakes it too (after it paused again)
        assert _wait(lambda: Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED, timeout=10)
        assert sbx.commands.run("echo awake").stdout == "awake\n"
    finally:
        sbx.kill()


# -- snapshots ---------------------------------------------------------------------------------------


def test_snapshot_is_an_independent_template(sandbox: Sandbox) -> None:
    sandbox.files.write("/home/user/shared.txt", "snapshot content")
    sandbox.commands.run("rm /etc/debian_version && mkdir -p /opt/new && echo n > /opt/new/f", user="root")
    snapshot = sandbox.create_snapshot()
    try:
        assert snapshot.snapshot_id and snapshot.names == []
        assert sandbox.is_running()  # paused only while its files were copied
        one = Sandbox.create(snapshot.snapshot_id, timeout=60)
        two = Sandbox.create(snapshot.snapshot_id, timeout=60)
        try:
            assert one.files.read("/home/user/shared.txt") == "snapshot content"
            assert not one.files.exists("/etc/debian_version")  # a deletion stays deleted
            assert one.files.read("/opt/new/f") == "n\n"
            one.files.write("/home/user/shared.txt", "changed in one")
            assert two.files.read("/home/user/shared.txt") == "snapshot content"
            assert sandbox.files.read("/home/user/shared.txt") == "snapshot content"
            assert one.get_info().template_id == snapshot.snapshot_id
        finally:
            one.kill()
            two.kill()
    finally:
        assert Sandbox.delete_snapshot(snapshot.snapshot_id) is True
    assert Sandbox.delete_snapshot(snapshot.snapshot_id) is False


def test_named_snapshots_list_filter_and_paginate(sandbox: Sandbox) -> None:
    name = f"snap-{uuid.uuid4().hex[:12]}"
    first = sandbox.create_snapshot(name=name)
    other = sandbox.create_snapshot()
    try:
        assert any(name in n for n in first.names)
        again = sandbox.create_snapshot(name=name)  # same name: a new build of the same snapshot
        assert again.snapshot_id == first.snapshot_id

        found = Sandbox.list_snapshots(name=name).next_items()
        assert [s.snapshot_id for s in found] == [first.snapshot_id]
        assert Sandbox.list_snapshots(name=f"{name}-does-not-exist").next_items() == []
        mine = Sandbox.list_snapshots(sandbox_id=sandbox.sandbox_id).next_items()
        assert {s.snapshot_id for s in mine} == {first.snapshot_id, other.snapshot_id}

        pager = Sandbox.list_snapshots(sandbox_id=sandbox.sandbox_id, limit=1)
        page1 = pager.next_items()
        assert pager.has_next and len(page1) == 1
        page2 = pager.next_items()
        assert not pager.has_next and len(page2) == 1
        assert {page1[0].snapshot_id, page2[0].snapshot_id} == {first.snapshot_id, other.snapshot_id}

        assert Sandbox.delete_snapshot(name) is True  # by its name, as by its id
        assert Sandbox.list_snapshots(name=name).next_items() == []
        assert Sandbox.delete_snapshot(first.snapshot_id) is False
    finally:
        Sandbox.delete_snapshot(first.snapshot_id)
        Sandbox.delete_snapshot(other.snapshot_id)


def test_snapshot_of_a_paused_sandbox(sandbox: Sandbox) -> None:
    sandbox.files.write("/home/user/p.txt", "paused state")
    sandbox.pause(keep_memory=False)
    snapshot = Sandbox.create_snapshot(sandbox.sandbox_id)
    try:
        assert Sandbox.get_info(sandbox.sandbox_id).state == SandboxState.PAUSED  # stays paused
        copy = Sandbox.create(snapshot.snapshot_id, timeout=30)
        try:
            assert copy.files.read("/home/user/p.txt") == "paused state"
        finally:
            copy.kill()
    finally:
        Sandbox.delete_snapshot(snapshot.snapshot_id)


# -- fork --------------------------------------------------------------------------------------------


def test_fork_copies_files_independently(sandbox: Sandbox) -> None:
    sandbox.files.write("/home/user/state.txt", "state before fork")
    forks = sandbox.fork(count=2, timeout=60)
    try:
        assert len(forks) == 2 and all(isinstance(f, Sandbox) for f in forks)
        ids = {f.sandbox_id for f in forks}
        assert len(ids) == 2 and sandbox.sandbox_id not in ids
        assert sandbox.is_running()
        for fork in forks:
            assert fork.is_running()
            assert fork.files.read("/home/user/state.txt") == "state before fork"
        forks[0].files.write("/home/user/state.txt", "modified in fork")
        assert sandbox.files.read("/home/user/state.txt") == "state before fork"
        assert forks[1].files.read("/home/user/state.txt") == "state before fork"
    finally:
        for fork in forks:
            if isinstance(fork, Sandbox):
                fork.kill()


def test_fork_of_killed_sandbox_is_not_found(e2b_env) -> None:
    sbx = Sandbox.create(timeout=30)
    sbx.kill()
    with pytest.raises(SandboxNotFoundException):
        sbx.fork()


# -- metrics and logs --------------------------------------------------------------------------------


def test_metrics_start_at_creation_and_filter_by_time(e2b_env) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    sbx = Sandbox.create(timeout=60)
    try:
        metrics = sbx.get_metrics()
        assert len(metrics) >= 1  # the first sample is taken at creation
        first = metrics[0]
        assert first.cpu_count >= 1 and first.mem_total == 512 * 1024 * 1024
        assert 0 <= first.cpu_used_pct <= 100 and first.mem_used > 0
        assert first.disk_total > 0 and 0 <= first.disk_used <= first.disk_total
        assert abs((first.timestamp - datetime.now(UTC)).total_seconds()) < 30
        assert sbx.get_metrics(start=before - timedelta(hours=1), end=before - timedelta(minutes=30)) == []
        sbx.commands.run("head -c 20000000 /dev/urandom > /home/user/blob")
        assert _wait(lambda: sbx.get_metrics()[-1].disk_used >= 20_000_000, timeout=10)
        window = sbx.get_metrics(start=before, end=datetime.now(UTC) + timedelta(seconds=1))
        assert window and all(before - timedelta(seconds=1) <= m.timestamp for m in window)
    finally:
        sbx.kill()


def test_logs_record_the_lifecycle(sandbox: Sandbox, e2b_env) -> None:
    sandbox.pause()
    sandbox.connect()
    with e2b_env.api() as api:
        r = api.get(f"/v2/sandboxes/{sandbox.sandbox_id}/logs")
        assert r.status_code == 200
        messages = [entry["message"] for entry in r.json()["logs"]]
        assert messages[0].startswith("sandbox created") and any("paused" in m for m in messages)
        assert any("resumed" in m for m in messages)
        r = api.get(f"/v2/sandboxes/{sandbox.sandbox_id}/logs", params={"direction": "backward", "limit": 1})
        assert [e["message"] for e in r.json()["logs"]] == [messages[-1]]
        assert api.get("/v2/sandboxes/doesnotexist/logs").status_code == 404


def test_pause_error_is_not_a_crash(e2b_env) -> None:
    """A SandboxException (not a server error) for a bad body; the sandbox is untouched."""
    sbx = Sandbox.create(timeout=30)
    try:
        with e2b_env.api() as api:
            r = api.post(f"/sandboxes/{sbx.sandbox_id}/fork", json={"count": 0})
            assert r.status_code == 400
            r = api.post(f"/sandboxes/{sbx.sandbox_id}/snapshots", json={"name": "bad:tag"})
            assert r.status_code == 400
        assert sbx.is_running()
    finally:
        sbx.kill()
    with pytest.raises(SandboxException):
        Sandbox.connect(sbx.sandbox_id)


def test_lifecycle_responses_match_the_spec(e2b_env) -> None:
    from corral.spec.openapi import validate_response

    with e2b_env.api() as api:
        sbx = api.post("/sandboxes", json={"templateID": "base", "timeout": 60, "autoPause": True}).json()
        sid = sbx["sandboxID"]
        try:
            checks = [
                ("POST", f"/sandboxes/{sid}/snapshots", {"name": f"spec-{uuid.uuid4().hex[:8]}"}),
                ("GET", f"/snapshots?sandboxID={sid}", None),
                ("GET", f"/sandboxes/{sid}/metrics", None),
                ("GET", f"/v2/sandboxes/{sid}/logs", None),
                ("POST", f"/sandboxes/{sid}/fork", {"count": 1, "timeout": 30}),
                ("POST", f"/sandboxes/{sid}/pause", {"memory": True}),
                ("POST", f"/sandboxes/{sid}/pause", {"memory": True}),  # 409
                ("GET", f"/sandboxes/{sid}", None),
                ("POST", f"/sandboxes/{sid}/connect", {"timeout": 60}),
                ("DELETE", "/templates/doesnotexist", None),
            ]
            answers = {}
            for method, path, body in checks:
                r = api.request(method, path, json=body)
                validate_response(path.split("?")[0], method, r.status_code, r.content or None)
                answers.setdefault(path, []).append(r)
            assert answers[f"/sandboxes/{sid}/pause"][1].status_code == 409
            assert answers[f"/sandboxes/{sid}/connect"][0].status_code == 201
            assert answers[f"/sandboxes/{sid}"][0].json()["state"] == "paused"
            assert answers[f"/sandboxes/{sid}"][0].json()["lifecycle"] == {
                "autoResume": False,
                "onTimeout": "pause",
            }
            snapshot_id = answers[f"/sandboxes/{sid}/snapshots"][0].json()["snapshotID"]
            r = api.delete(f"/templates/{snapshot_id}")
            validate_response(f"/templates/{snapshot_id}", "DELETE", r.status_code, r.content or None)
            assert r.status_code == 204
            for item in answers[f"/sandboxes/{sid}/fork"][0].json():
                api.delete(f"/sandboxes/{item['sandbox']['sandboxID']}")
        finally:
            api.delete(f"/sandboxes/{sid}")

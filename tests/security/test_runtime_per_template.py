"""Per-template runtime: a template built with `runtime=` runs its sandboxes on that runtime while
the server's other sandboxes stay on its default (gVisor class Escape: an operator puts the most
hostile workloads in gVisor without a second server).

On a crun server (the default) the template asks for runsc and its sandboxes must really be in
gVisor (the Sentry's `dmesg`); on a runsc server (`CORRAL_RUNTIME=runsc`) it asks for crun and its
sandboxes must not be. Either way: the runtime's own state root holds the container, snapshots
and forks keep the runtime, a SIGKILLed server re-adopts the sandbox with the right runtime, and
an unknown runtime name is refused at build time.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from e2b import Sandbox, SandboxState

from corral import SandboxException, Template
from tests.conftest import TEST_API_KEY, ServerProcess
from tests.security._probes import run
from tests.security.conftest import DEFAULT_RUNTIME, SandboxFactory, sdk_opts

pytestmark = [pytest.mark.integration]

OTHER_RUNTIME = "crun" if DEFAULT_RUNTIME == "runsc" else "runsc"


def _in_gvisor(sbx: Sandbox) -> bool:
    """gVisor's Sentry answers `dmesg` with its own boot log ("Starting gVisor..."); the host
    kernel's log is closed to sandboxes (no CAP_SYSLOG), so crun sandboxes never show it."""
    return "gVisor" in run(sbx, "dmesg 2>&1 | head -5").stdout


def _containers(binary: str, state_root: str) -> list[str]:
    argv = [binary, "--root", state_root, "list", "--format", "json"]
    out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    return [c["id"] for c in json.loads(out.stdout or "[]") or []]


def _other_root(server: ServerProcess) -> str:
    return str(server.home / f"runtime-{OTHER_RUNTIME}")


@pytest.fixture(scope="module")
def other_template(corral_server: ServerProcess) -> Iterator[str]:
    """A template whose sandboxes run on the runtime that is not the server's default."""
    if shutil.which(OTHER_RUNTIME) is None:
        pytest.skip(f"{OTHER_RUNTIME} is not installed")
    name = f"rt-{OTHER_RUNTIME}-{uuid.uuid4().hex[:8]}"
    template = Template().from_template("base").run_cmd("echo from-the-build > /home/user/built", user="root")
    Template.build(template, name, runtime=OTHER_RUNTIME, api_url=corral_server.url, api_key=TEST_API_KEY)
    try:
        yield name
    finally:
        Template.delete(name, api_url=corral_server.url, api_key=TEST_API_KEY)


def test_template_runtime_is_used_beside_the_default(
    corral_server: ServerProcess, other_template: str, make_sandbox: SandboxFactory
) -> None:
    default_sbx = make_sandbox()
    other = make_sandbox(template=other_template)
    assert _in_gvisor(other) is (OTHER_RUNTIME == "runsc")
    assert _in_gvisor(default_sbx) is (DEFAULT_RUNTIME == "runsc")
    # Each runtime keeps its containers in its own state root.
    assert other.sandbox_id in _containers(OTHER_RUNTIME, _other_root(corral_server))
    assert other.sandbox_id not in _containers(DEFAULT_RUNTIME, str(corral_server.home / "runtime"))
    # The same API works on it: exec, files, the template's files.
    assert other.files.read("/home/user/built") == "from-the-build\n"
    other.files.write("/tmp/x.txt", "via the api")
    assert other.commands.run("cat /tmp/x.txt; echo; whoami").stdout == "via the api\nuser\n"
    other.kill()
    deadline = time.monotonic() + 20  # kill answers first, then removes the container
    while time.monotonic() < deadline and other.sandbox_id in _containers(
        OTHER_RUNTIME, _other_root(corral_server)
    ):
        time.sleep(0.2)
    assert other.sandbox_id not in _containers(OTHER_RUNTIME, _other_root(corral_server))


def test_snapshots_forks_and_cold_boots_keep_the_runtime(
    corral_server: ServerProcess, other_template: str, make_sandbox: SandboxFactory
) -> None:
    sbx = make_sandbox(template=other_template)
    sbx.files.write("/home/user/mark", "kept")
    snapshot = sbx.create_snapshot()
    try:
        from_snapshot = make_sandbox(template=snapshot.snapshot_id)
        assert from_snapshot.files.read("/home/user/mark") == "kept"
        assert _in_gvisor(from_snapshot) is (OTHER_RUNTIME == "runsc")
    finally:
        Sandbox.delete_snapshot(snapshot.snapshot_id, **sdk_opts(corral_server))
    sbx.pause(keep_memory=False)  # stopped: the next connect boots it again
    resumed = Sandbox.connect(sbx.sandbox_id, **sdk_opts(corral_server))
    assert resumed.files.read("/home/user/mark") == "kept"
    assert _in_gvisor(resumed) is (OTHER_RUNTIME == "runsc")


def test_restart_adopts_sandboxes_of_both_runtimes(
    corral_server: ServerProcess, other_template: str, make_sandbox: SandboxFactory
) -> None:
    """Also a paused one: on runsc a pause is `runsc pause` (a cgroup-frozen Sentry would make
    every runsc command of the restarted server's reconcile hang)."""
    default_sbx, other, paused = (
        make_sandbox(),
        make_sandbox(template=other_template),
        make_sandbox(template=other_template),
    )
    for sbx in (default_sbx, other, paused):
        sbx.commands.run("sleep 1000", background=True)
    paused.pause()
    corral_server.restart(signal.SIGKILL)
    assert Sandbox.get_info(paused.sandbox_id, **sdk_opts(corral_server)).state == SandboxState.PAUSED
    resumed = Sandbox.connect(paused.sandbox_id, **sdk_opts(corral_server))
    for sbx, gvisor in (
        (default_sbx, DEFAULT_RUNTIME == "runsc"),
        (other, OTHER_RUNTIME == "runsc"),
        (resumed, OTHER_RUNTIME == "runsc"),
    ):
        assert sbx.is_running()
        assert "sleep 1000" in sbx.commands.run("ps -eo args").stdout  # the same container, adopted
        assert _in_gvisor(sbx) is gvisor
    assert other.sandbox_id in _containers(OTHER_RUNTIME, _other_root(corral_server))
    resumed.pause()  # killing a paused sandbox of either runtime returns and removes it
    assert resumed.kill() is True
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and resumed.sandbox_id in _containers(
        OTHER_RUNTIME, _other_root(corral_server)
    ):
        time.sleep(0.2)
    assert resumed.sandbox_id not in _containers(OTHER_RUNTIME, _other_root(corral_server))


@pytest.mark.parametrize("name", ["docker", "/bin/sh", "../crun"])
def test_unknown_runtime_is_refused_at_build(corral_server: ServerProcess, name: str) -> None:
    """A template names a runtime, never a binary: anything but crun, runc or runsc is a 400."""
    with httpx.Client(base_url=corral_server.url, headers={"X-API-Key": TEST_API_KEY}, timeout=30) as api:
        answer = api.post("/v3/templates", json={"name": f"rt-bad-{uuid.uuid4().hex[:8]}", "runtime": name})
    assert answer.status_code == 400, answer.text
    assert "unknown runtime" in answer.json()["message"]
    with pytest.raises(SandboxException, match="unknown runtime"):
        Template.build(
            Template().from_template("base"), f"rt-bad-{uuid.uuid4().hex[:8]}", runtime=name,
            api_url=corral_server.url, api_key=TEST_API_KEY,
        )  # fmt: skip

"""A server killed with SIGKILL while sandboxes run, are frozen and are stopped: after the restart all
three are as they were (state, files, processes, boot, address) and can be resumed."""

from __future__ import annotations

import signal

import pytest
from e2b import Sandbox, SandboxState

from tests.conftest import ServerProcess

pytestmark = pytest.mark.integration

# Read with a command: on gVisor /proc lives in the Sentry, where envd's file API does not reach.
BOOT_ID = "/proc/sys/kernel/random/boot_id"


def test_running_frozen_and_stopped_sandboxes_survive_sigkill(e2b_env: ServerProcess) -> None:
    kinds = ("running", "frozen", "stopped")
    sandboxes = {kind: Sandbox.create(timeout=300) for kind in kinds}
    try:
        facts = {}
        for kind, sbx in sandboxes.items():
            sbx.files.write("/home/user/kind", kind)
            sbx.commands.run("sleep 1000", background=True)
            facts[kind] = (sbx.commands.run(f"cat {BOOT_ID}").stdout, sbx.commands.run("hostname -I").stdout.split()[0])
        sandboxes["frozen"].pause()
        sandboxes["stopped"].pause(keep_memory=False)

        e2b_env.restart(signal.SIGKILL)

        states = {kind: Sandbox.get_info(sbx.sandbox_id).state for kind, sbx in sandboxes.items()}
        assert states == {
            "running": SandboxState.RUNNING,
            "frozen": SandboxState.PAUSED,
            "stopped": SandboxState.PAUSED,
        }
        assert sandboxes["running"].is_running()
        assert not sandboxes["frozen"].is_running() and not sandboxes["stopped"].is_running()
        with e2b_env.api() as api:
            for kind in ("frozen", "stopped"):
                assert api.post(f"/sandboxes/{sandboxes[kind].sandbox_id}/pause", json={}).status_code == 409

        for kind, sbx in sandboxes.items():
            resumed = Sandbox.connect(sbx.sandbox_id)
            boot, ip = facts[kind]
            assert resumed.files.read("/home/user/kind") == kind
            assert resumed.commands.run("hostname -I").stdout.split()[0] == ip
            processes = resumed.commands.run("ps -eo args").stdout
            if kind == "stopped":
                assert "sleep 1000" not in processes and resumed.commands.run(f"cat {BOOT_ID}").stdout != boot
            else:
                assert "sleep 1000" in processes and resumed.commands.run(f"cat {BOOT_ID}").stdout == boot
    finally:
        for sbx in sandboxes.values():
            sbx.kill()

"""With CORRAL_USERNS=1, sandbox root is not host root (gVisor class Escape, attacker = SandboxRoot):
the sandbox's uids map to an unprivileged host range of its own, `sudo` stays root inside only.

User namespaces are off by default: envd's file API does not map owners yet (see
docs/security.md); `test_file_api_owner_gap_is_still_open` pins that gap so whoever closes it
updates the docs and turns the default on.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.node.runtime.idmap import FIRST_BASE, SANDBOX_IDS
from tests.conftest import ServerProcess
from tests.security._probes import run
from tests.security.conftest import SandboxFactory

pytestmark = [pytest.mark.integration, pytest.mark.compat]


def _host_ids(pid: int) -> tuple[int, int]:
    fields = dict(
        line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line
    )
    return int(fields["Uid"].split()[0]), int(fields["Gid"].split()[0])


def test_sandbox_root_is_an_unprivileged_host_uid(
    userns_server: ServerProcess, make_sandbox: SandboxFactory
) -> None:
    """Escape: sudo gives uid 0 inside; on the host that process is base+0 (>= 2^20), each sandbox
    has its own range, files sandbox root writes are owned by that host uid, and root inside can
    still bind port 80 (its netns allows unprivileged low ports)."""
    a, b = make_sandbox(userns_server), make_sandbox(userns_server)
    bases = []
    for sbx in (a, b):
        assert run(sbx, "sudo -n id -u", user="user").stdout == "0\n"
        init_pid = int((userns_server.home / "sandboxes" / sbx.sandbox_id / "init.pid").read_text())
        uid, gid = _host_ids(init_pid)
        assert uid >= FIRST_BASE and gid >= FIRST_BASE and (uid - FIRST_BASE) % SANDBOX_IDS == 0
        assert run(sbx, "cat /proc/self/uid_map").stdout.split() == ["0", str(uid), str(SANDBOX_IDS)]
        bases.append(uid)
        run(sbx, "sudo -n touch /tmp/made-by-root", user="user")
        rootfs = userns_server.home / "sandboxes" / sbx.sandbox_id / "rootfs"
        assert (rootfs / "tmp" / "made-by-root").stat().st_uid == uid
        assert "rc=124" in run(sbx, "timeout 1 python3 -m http.server 80 >/dev/null 2>&1; echo rc=$?").stdout
    assert bases[0] != bases[1]
    # still inside every other wall
    out = run(
        a,
        "mount -t tmpfs x /mnt 2>/dev/null && echo MOUNTED; unshare -U true 2>/dev/null && echo UNSHARED; echo done",
    )
    assert out.stdout == "done\n"


def test_file_api_owner_gap_is_still_open(userns_server: ServerProcess, make_sandbox: SandboxFactory) -> None:
    """Known gap (docs/security.md): envd chowns uploads to sandbox uid 1000 from the host side,
    which is not mapped in the sandbox's range, so the file shows as 65534 inside. When envd maps
    owners through an IdMap this fails: update docs/security.md and turn CORRAL_USERNS on."""
    sbx = make_sandbox(userns_server)
    sbx.files.write("/home/user/api.txt", "x")
    owner = "import os; print(os.stat('/home/user/api.txt').st_uid)"
    assert run(sbx, f'python3 -c "{owner}"', user="user").stdout == "65534\n"

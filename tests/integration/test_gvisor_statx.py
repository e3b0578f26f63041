"""coreutils 9 `stat`, `ls -l` and `ls -A` work in sandboxes on every runtime.

On runsc they work through Corral's statx shim (`corral.node.runtime.statx_shim`): gVisor 20221219
refuses AT_NO_AUTOMOUNT, so its sandboxes preload native/corral-statx.c through a read-only
/etc/ld.so.preload that keeps the template's own lines. Attack surface: the shim and that file
are bound read-only, so sandbox root can neither change the host's shim nor drop the preload.
On crun nothing of this exists in the sandbox. Run under CORRAL_RUNTIME=runsc and under crun.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
from e2b import Sandbox

from corral.core.settings import load_settings
from corral.node.runtime.statx_shim import SHIM_FILE_NAME, SHIM_PATH
from tests.conftest import ServerProcess
from tests.gvisor import RUNSC

pytestmark = pytest.mark.integration

HOST_SHIM = load_settings().init_binary.with_name(SHIM_FILE_NAME)
TEMPLATE_PRELOAD = "/lib/x86_64-linux-gnu/libdl.so.2"  # a real, harmless library of the base template


@pytest.fixture(scope="module")
def sandbox(e2b_env: ServerProcess) -> Iterator[Sandbox]:
    sbx = Sandbox.create(timeout=120)
    try:
        yield sbx
    finally:
        sbx.kill()


@pytest.mark.parametrize("user", ["user", "root"])
def test_stat_and_ls_work(sandbox: Sandbox, user: str) -> None:
    sandbox.commands.run("touch /home/user/.hidden; mkdir -p /home/user/dir", user="user")
    assert sandbox.commands.run("stat -c '%U %a %F' /home/user/.hidden /home/user/dir", user=user).stdout == (
        "user 644 regular empty file\nuser 755 directory\n"
    )
    listed = sandbox.commands.run("ls -A /home/user", user=user).stdout.split()
    assert {".hidden", "dir"} <= set(listed)
    passwd, tmp = (
        line.split()
        for line in sandbox.commands.run("ls -l /etc/passwd; ls -ld /tmp", user=user).stdout.splitlines()
    )
    assert (passwd[0], passwd[2], passwd[3], passwd[-1]) == ("-rw-r--r--", "root", "root", "/etc/passwd")
    assert (tmp[0], tmp[-1]) == ("drwxrwxrwt", "/tmp")
    # Errors other than gVisor's refusal come through unchanged.
    missing = sandbox.commands.run("stat /nonexistent 2>&1; echo rc=$?", user=user).stdout
    assert "No such file or directory" in missing and missing.endswith("rc=1\n")


def test_shim_and_preload_are_read_only(sandbox: Sandbox) -> None:
    if not RUNSC:  # crun is untouched: no shim, no preload file
        probe = f"test -e {SHIM_PATH} || echo no-shim; test -e /etc/ld.so.preload || echo no-preload"
        assert sandbox.commands.run(probe).stdout == "no-shim\nno-preload\n"
        return
    assert HOST_SHIM.is_file(), f"{HOST_SHIM}: run scripts/bootstrap.sh"
    before = hashlib.sha256(HOST_SHIM.read_bytes()).hexdigest()
    preload = sandbox.commands.run("cat /etc/ld.so.preload").stdout
    assert preload == f"{SHIM_PATH}\n"  # the base template has none of its own
    attacks = (
        f"cp /bin/true {SHIM_PATH}",
        f": > {SHIM_PATH}",
        f"rm -f {SHIM_PATH}",
        "echo > /etc/ld.so.preload",
        "rm -f /etc/ld.so.preload",
        "mv /etc/ld.so.preload /etc/x",
        f"umount {SHIM_PATH}",
        "umount /etc/ld.so.preload",
        f"mount -o remount,rw,bind {SHIM_PATH}",
    )
    for attack in attacks:
        out = sandbox.commands.run(f"{attack} 2>/dev/null; echo $?", user="root").stdout
        assert out != "0\n", f"sandbox root could run: {attack}"
    # envd's file API writes the sandbox's own tree, never the host's shim behind the bind.
    sandbox.files.write(SHIM_PATH, "not a shim", user="root")
    assert hashlib.sha256(HOST_SHIM.read_bytes()).hexdigest() == before
    assert sandbox.commands.run("cat /etc/ld.so.preload").stdout == preload
    assert "statx.so" in sandbox.commands.run("cat /proc/self/maps").stdout
    assert sandbox.commands.run("ls -ld /").stdout.startswith("d")


def test_the_template_preload_lines_are_kept(e2b_env: ServerProcess) -> None:
    """A template's own /etc/ld.so.preload (here: written by the file API, kept by a snapshot) stays
    in force: on runsc after the shim's line, on crun alone."""
    original = Sandbox.create(timeout=60)
    try:
        original.files.write("/etc/ld.so.preload", f"{TEMPLATE_PRELOAD}\n", user="root")
        snapshot = original.create_snapshot()
    finally:
        original.kill()
    copy = Sandbox.create(snapshot.snapshot_id, timeout=60)
    try:
        expected = (f"{SHIM_PATH}\n" if RUNSC else "") + f"{TEMPLATE_PRELOAD}\n"
        assert copy.commands.run("cat /etc/ld.so.preload").stdout == expected
        maps = copy.commands.run("cat /proc/self/maps", user="user").stdout
        assert "libdl.so.2" in maps
        assert ("statx.so" in maps) is RUNSC
        assert copy.commands.run("ls -l /etc/ld.so.preload; stat -c %U /home/user").stdout.endswith("user\n")
        assert copy.commands.run("ls -A / >/dev/null 2>&1; echo $?", user="user").stdout == "0\n"
    finally:
        copy.kill()
        Sandbox.delete_snapshot(snapshot.snapshot_id)

"""Sandbox root is not host root (gVisor class Escape, attacker = SandboxRoot): on crun every sandbox
runs in a user namespace of its own (the default), so `sudo` is root inside only and, seen from the
host, the sandbox's processes and files belong to an unprivileged host id range. Everything the host
does in a sandbox's files keeps the sandbox's view of owners: envd's file API, snapshots, forks,
cold boots and a restarted server's adoption.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from e2b import Sandbox, Template

from corral.node.runtime.idmap import FIRST_BASE, SANDBOX_IDS
from tests.conftest import ServerProcess
from tests.security._probes import run
from tests.security.conftest import SandboxFactory, sdk_opts

pytestmark = [pytest.mark.integration, pytest.mark.compat]


def _host_ids(pid: int) -> tuple[int, int]:
    fields = dict(
        line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line
    )
    return int(fields["Uid"].split()[0]), int(fields["Gid"].split()[0])


def _sandbox_dir(server: ServerProcess, sbx: Sandbox) -> Path:
    return server.home / "sandboxes" / sbx.sandbox_id


def _host_pids_of(init_pid: int, marker: str) -> list[int]:
    """Host pids of the processes in the sandbox (init's pid namespace) whose command line has `marker`."""
    ns = Path(f"/proc/{init_pid}/ns/pid").readlink()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "ns" / "pid").readlink() == ns and marker in (proc / "cmdline").read_bytes().decode(
                errors="replace"
            ):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


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
        init_pid = int((_sandbox_dir(userns_server, sbx) / "init.pid").read_text())
        uid, gid = _host_ids(init_pid)
        assert uid >= FIRST_BASE and gid >= FIRST_BASE and (uid - FIRST_BASE) % SANDBOX_IDS == 0
        assert run(sbx, "cat /proc/self/uid_map").stdout.split() == ["0", str(uid), str(SANDBOX_IDS)]
        bases.append(uid)
        run(sbx, "sudo -n touch /tmp/made-by-root", user="user")
        rootfs = _sandbox_dir(userns_server, sbx) / "rootfs"
        assert (rootfs / "tmp" / "made-by-root").stat().st_uid == uid
        assert "rc=124" in run(sbx, "timeout 1 python3 -m http.server 80 >/dev/null 2>&1; echo rc=$?").stdout
    assert bases[0] != bases[1]
    # Processes started through envd, as root (sudo) and as the user: host uids of the range.
    base = bases[0]
    a.commands.run("sudo -n sleep 301", user="user", background=True)
    a.commands.run("sleep 302", user="user", background=True)
    init_pid = int((_sandbox_dir(userns_server, a) / "init.pid").read_text())
    # ps shows sandbox ids; sudo takes a moment to exec its sleep
    waiting = "for i in $(seq 100); do [ $(ps -C sleep -o args= | grep -c 'sleep 30') = 2 ] && break; sleep 0.1; done"
    inside = run(a, f"{waiting}; ps -C sleep -o uid=,args=").stdout
    assert sorted(line.split()[0] for line in inside.splitlines() if "sleep 30" in line) == ["0", "1000"]
    for marker, sandbox_uid in (("sleep\x00301", 0), ("sleep\x00302", 1000)):
        pids = [
            p for p in _host_pids_of(init_pid, marker) if "sudo" not in Path(f"/proc/{p}/cmdline").read_text()
        ]
        assert pids, f"no host process for {marker!r}"
        assert {_host_ids(pid)[0] for pid in pids} == {base + sandbox_uid}
    # still inside every other wall
    out = run(
        a,
        "mount -t tmpfs x /mnt 2>/dev/null && echo MOUNTED; unshare -U true 2>/dev/null && echo UNSHARED; echo done",
    )
    assert out.stdout == "done\n"


def test_file_api_owners_are_the_sandbox_users(
    userns_server: ServerProcess, make_sandbox: SandboxFactory
) -> None:
    """envd works from the host: what it creates belongs to the sandbox user's host id and what it
    reports are the sandbox's ids (names from its /etc/passwd), never host ids."""
    sbx = make_sandbox(userns_server)
    sbx.files.write("/home/user/api.txt", "x")
    sbx.files.write("/tmp/by-root.txt", "x", user="root")
    sbx.files.make_dir("/home/user/made/deep")
    run(sbx, "touch /home/user/odd && chown 12345:54321 /home/user/odd")
    owners = run(
        sbx, "stat -c '%n %u:%g' /home/user/api.txt /tmp/by-root.txt /home/user/made /home/user/made/deep"
    )
    assert owners.stdout.splitlines() == [
        "/home/user/api.txt 1000:1000", "/tmp/by-root.txt 0:0", "/home/user/made 1000:1000", "/home/user/made/deep 1000:1000",
    ]  # fmt: skip
    assert run(sbx, "ls -ln /home/user/api.txt").stdout.split()[2:4] == ["1000", "1000"]
    base = _host_ids(int((_sandbox_dir(userns_server, sbx) / "init.pid").read_text()))[0]
    assert (_sandbox_dir(userns_server, sbx) / "rootfs/home/user/api.txt").stat().st_uid == base + 1000
    info = sbx.files.get_info("/home/user/api.txt")
    assert (info.owner, info.group) == ("user", "user")
    odd = sbx.files.get_info("/home/user/odd")
    assert (odd.owner, odd.group) == ("12345", "54321")
    listed = {entry.name: (entry.owner, entry.group) for entry in sbx.files.list("/home/user")}
    assert listed["api.txt"] == ("user", "user") and listed["made"] == ("user", "user")
    root_info = sbx.files.get_info("/tmp/by-root.txt")
    assert (root_info.owner, root_info.group) == ("root", "root")
    assert sbx.files.get_info("/usr/bin/sudo").owner == "root"  # a template layer file (host root on disk)
    # The user can change what the API wrote for it, as in E2B.
    assert (
        run(sbx, "echo more >> /home/user/api.txt && rm -r /home/user/made && echo ok", user="user").stdout
        == "ok\n"
    )


_OWNED = """
set -e
mkdir -p /srv/own/sub
echo a > /srv/own/u1000 && chown 1000:1000 /srv/own/u1000
echo b > /srv/own/odd && chown 12345:54321 /srv/own/odd
cp /usr/bin/id /srv/own/suid && chmod 4755 /srv/own/suid
chgrp 50 /srv/own/sub && chmod 2775 /srv/own/sub
ln -s u1000 /srv/own/link && chown -h 1000:1000 /srv/own/link
chown 1000:1000 /srv
cp /usr/bin/id /srv/own/capped && setcap cap_net_bind_service+ep /srv/own/capped
"""
_SHOW = (
    "stat -c '%n %u:%g %a' /srv /srv/own/u1000 /srv/own/odd /srv/own/suid /srv/own/sub /srv/own/link"
    " && getcap /srv/own/capped"
)


def test_snapshots_forks_and_cold_boots_keep_owners_and_modes(
    userns_server: ServerProcess, make_sandbox: SandboxFactory
) -> None:
    """A sandbox's files go into layers shifted back to sandbox ids: a snapshot's and a fork's
    sandboxes (other id ranges) see the same owners, setuid and setgid bits and file
    capabilities as the original, and a setuid binary still works there."""
    sbx = make_sandbox(userns_server)
    assert run(sbx, _OWNED).exit_code == 0
    expected = run(sbx, _SHOW).stdout
    assert "/srv/own/odd 12345:54321 644" in expected and "/srv/own/suid 0:0 4755" in expected
    assert "/srv 1000:1000" in expected  # a template directory, copied up
    assert "cap_net_bind_service=ep" in expected  # a file capability (v3, rootid = the sandbox's root)
    snapshot = sbx.create_snapshot()
    try:
        from_snapshot = make_sandbox(userns_server, template=snapshot.snapshot_id)
        forks = sbx.fork()
        assert len(forks) == 1 and isinstance(forks[0], Sandbox), forks
        fork = forks[0]
        try:
            for other in (from_snapshot, fork):
                assert run(other, _SHOW).stdout == expected
                assert run(other, "/srv/own/suid -u", user="user").stdout == "0\n"  # setuid works
            layers = [p for p in (userns_server.home / "layers").glob("*/srv/own/odd")]
            assert layers and all((p.stat().st_uid, p.stat().st_gid) == (12345, 54321) for p in layers)
        finally:
            fork.kill()
        # A file-system-only pause cold-boots the sandbox on its own files and range.
        assert sbx.pause(keep_memory=False) is True
        resumed = Sandbox.connect(sbx.sandbox_id, **sdk_opts(userns_server))
        assert run(resumed, _SHOW).stdout == expected
        resumed.files.write("/home/user/after.txt", "x")
        assert run(resumed, "stat -c %u:%g /home/user/after.txt").stdout == "1000:1000\n"
    finally:
        Sandbox.delete_snapshot(snapshot.snapshot_id, **sdk_opts(userns_server))


def test_adopted_sandboxes_keep_their_range_and_owners(
    e2b_env: ServerProcess, userns_server: ServerProcess
) -> None:
    """After a server restart the node re-adopts sandboxes with their id map (the `idmap` file):
    envd still maps owners, and a stopped sandbox cold-boots on its own range."""
    running, stopped = Sandbox.create(timeout=300), Sandbox.create(timeout=300)
    try:
        bases = {}
        for sbx in (running, stopped):
            bases[sbx.sandbox_id] = _host_ids(int((_sandbox_dir(e2b_env, sbx) / "init.pid").read_text()))[0]
        stopped.pause(keep_memory=False)
        e2b_env.restart(signal.SIGKILL)
        for sbx in (running, Sandbox.connect(stopped.sandbox_id)):
            sbx.files.write("/home/user/after-restart.txt", "x")
            assert run(sbx, "stat -c %u:%g /home/user/after-restart.txt").stdout == "1000:1000\n"
            assert sbx.files.get_info("/home/user/after-restart.txt").owner == "user"
            init_pid = int((_sandbox_dir(e2b_env, sbx) / "init.pid").read_text())
            assert _host_ids(init_pid)[0] == bases[sbx.sandbox_id]
    finally:
        for sbx in (running, stopped):
            sbx.kill()


def test_template_build_layers_are_unshifted(e2b_env: ServerProcess, userns_server: ServerProcess) -> None:
    """Build sandboxes run in user namespaces too; the layers their steps leave are owned as the
    files are inside (not by the build sandbox's range), so the template's sandboxes see them so."""
    name = f"userns-{uuid.uuid4().hex[:8]}"
    marker = uuid.uuid4().hex  # a step nobody built before
    template = (
        Template()
        .from_template("base")
        .run_cmd(
            f"mkdir -p /srv/built && echo {marker} > /srv/built/odd && chown 12345:54321 /srv/built/odd"
            " && cp /usr/bin/id /srv/built/suid && chmod 4755 /srv/built/suid",
            user="root",
        )
        .run_cmd("echo mine > /home/user/mine")
    )
    Template.build(template, name)
    try:
        built = [
            p for p in (e2b_env.home / "layers").glob("*/srv/built/odd") if p.read_text().strip() == marker
        ]
        assert built and {(p.stat().st_uid, p.stat().st_gid) for p in built} == {(12345, 54321)}
        mine = [p for p in (e2b_env.home / "layers").glob("*/home/user/mine")]
        assert mine and all(p.stat().st_uid == 1000 for p in mine)
        sbx = Sandbox.create(name, timeout=60)
        try:
            shown = run(sbx, "stat -c '%n %u:%g %a' /srv/built/odd /srv/built/suid /home/user/mine").stdout
            assert shown.splitlines() == [
                "/srv/built/odd 12345:54321 644", "/srv/built/suid 0:0 4755", "/home/user/mine 1000:1000 644",
            ]  # fmt: skip
            assert run(sbx, "/srv/built/suid -u", user="user").stdout == "0\n"
        finally:
            sbx.kill()
    finally:
        with e2b_env.api() as api:
            api.delete(f"/templates/{name}")


def test_an_escaped_process_cannot_read_the_home(userns_server: ServerProcess) -> None:
    """What a process that broke out of its sandbox would run as — an unprivileged host uid of a
    sandbox range — cannot list the home or read layers, templates, build logs or the database."""
    home = userns_server.home
    uid = FIRST_BASE  # the root of the first sandbox range
    probe = (
        "import os, sys\n"
        f"os.setgroups([]); os.setgid({uid}); os.setuid({uid})\n"
        "home = sys.argv[1]\n"
        "hits = []\n"
        "for path in [home, home + '/layers', home + '/templates', home + '/builds', home + '/corral.db']:\n"
        "    try:\n"
        "        os.listdir(path) if os.path.isdir(path) else open(path, 'rb').read(1)\n"
        "        hits.append(path)\n"
        "    except (PermissionError, FileNotFoundError):\n"
        "        pass\n"
        "print(' '.join(hits))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(home)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"readable by host uid {uid}: {out.stdout}"
    assert (home / "layers").is_dir()  # the probe looked at something that is there

"""The same lifecycle, exec and file behaviour on every runtime (crun, and runsc when installed),
driven by the official e2b SDK against a real server per runtime.

The one documented difference: runsc always sets no_new_privs, so `sudo` cannot gain root there
(run commands as root through the API instead); the test pins that behaviour on both sides.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time

import pytest
from e2b import CommandExitException, PtySize, Sandbox, TimeoutException

from tests.conftest import ServerProcess
from tests.security.conftest import DEFAULT_RUNTIME, SandboxFactory, sdk_opts

pytestmark = [pytest.mark.integration, pytest.mark.compat]


def _is_runsc(server: ServerProcess) -> bool:
    return server.env.get("CORRAL_RUNTIME", DEFAULT_RUNTIME) == "runsc"


def _containers(server: ServerProcess) -> list[str]:
    binary = "runsc" if _is_runsc(server) else "crun"
    argv = [binary, "--root", str(server.home / "runtime"), "list", "--format", "json"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return [c["id"] for c in json.loads(out.stdout or "[]") or []]


def test_lifecycle(runtime_server: ServerProcess, make_sandbox: SandboxFactory) -> None:
    sbx = make_sandbox(runtime_server, metadata={"suite": "parity"})
    assert sbx.is_running()
    assert sbx.sandbox_id in _containers(runtime_server)
    listed = Sandbox.list(**sdk_opts(runtime_server)).next_items()
    assert sbx.sandbox_id in {s.sandbox_id for s in listed}
    sbx.set_timeout(120)
    assert sbx.get_info().sandbox_id == sbx.sandbox_id
    sbx.kill()
    assert not sbx.is_running()
    deadline = time.monotonic() + 20  # kill answers first, then removes the container
    while time.monotonic() < deadline and sbx.sandbox_id in _containers(runtime_server):
        time.sleep(0.2)
    assert sbx.sandbox_id not in _containers(runtime_server)


def test_exec(runtime_server: ServerProcess, make_sandbox: SandboxFactory) -> None:
    sbx = make_sandbox(runtime_server)
    result = sbx.commands.run("echo out; echo err >&2; whoami; pwd")
    assert (result.stdout, result.stderr, result.exit_code) == ("out\nuser\n/home/user\n", "err\n", 0)
    with pytest.raises(CommandExitException) as failed:
        sbx.commands.run("echo partial; exit 3")
    assert failed.value.exit_code == 3 and failed.value.stdout == "partial\n"
    assert sbx.commands.run("whoami", user="root").stdout == "root\n"
    assert sbx.commands.run("echo $FOO", envs={"FOO": "bar"}).stdout == "bar\n"
    assert sbx.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    # stdin, background processes and kill
    handle = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.send_stdin(handle.pid, "through stdin\n")
    sbx.commands.close_stdin(handle.pid)
    assert handle.wait().stdout == "through stdin\n"
    sleeper = sbx.commands.run("sleep 300", background=True)
    assert any(p.pid == sleeper.pid for p in sbx.commands.list())
    assert sleeper.kill()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(p.pid == sleeper.pid for p in sbx.commands.list()):
        time.sleep(0.1)
    assert not any(p.pid == sleeper.pid for p in sbx.commands.list())
    # a terminal
    received: list[bytes] = []
    terminal = sbx.pty.create(PtySize(rows=24, cols=80), timeout=60)
    sbx.pty.send_stdin(terminal.pid, b"echo tty-$((40+2)); exit\n")
    terminal.wait(on_pty=received.append)
    assert "tty-42" in b"".join(received).decode(errors="replace")


def test_files(runtime_server: ServerProcess, make_sandbox: SandboxFactory) -> None:
    sbx = make_sandbox(runtime_server)
    sbx.files.write("/home/user/a.txt", "from the api")
    assert sbx.commands.run("cat /home/user/a.txt").stdout == "from the api"
    sbx.commands.run("echo from-a-command > /tmp/b.txt")  # /tmp too: runsc must not hide it
    assert sbx.files.read("/tmp/b.txt") == "from-a-command\n"
    payload = bytes(range(256)) * 4000
    sbx.files.write("/tmp/blob.bin", payload)
    assert sbx.files.read("/tmp/blob.bin", format="bytes") == payload
    assert (
        sbx.commands.run("sha256sum /tmp/blob.bin").stdout.split()[0] == hashlib.sha256(payload).hexdigest()
    )
    sbx.files.make_dir("/home/user/d/e")
    sbx.files.rename("/home/user/a.txt", "/home/user/d/e/a.txt")
    assert [e.name for e in sbx.files.list("/home/user/d/e")] == ["a.txt"]
    owner = "import os, pwd; print(pwd.getpwuid(os.stat('/home/user/d/e/a.txt').st_uid).pw_name)"
    assert sbx.commands.run(f'python3 -c "{owner}"').stdout == "user\n"
    sbx.files.remove("/home/user/d")
    assert not sbx.files.exists("/home/user/d")
    assert sbx.commands.run("test -e /home/user/d || echo gone").stdout == "gone\n"


def test_stat_and_ls_work_on_every_runtime(runtime_server: ServerProcess, make_sandbox: SandboxFactory) -> None:
    """Debian's runsc 20221219 refuses statx's AT_NO_AUTOMOUNT, which coreutils 9 `stat` and `ls -l`
    pass; its sandboxes preload Corral's statx shim (`corral.node.runtime.statx_shim`), so the
    answers are the same as on crun."""
    sbx = make_sandbox(runtime_server)
    result = sbx.commands.run("stat -c %U /home/user 2>&1; ls -ld /home/user >/dev/null 2>&1; echo ls=$?")
    assert result.stdout == "user\nls=0\n"


def test_sudo_works_only_where_setuid_can(
    runtime_server: ServerProcess, make_sandbox: SandboxFactory
) -> None:
    """crun: `sudo` gives root inside the sandbox. runsc: gVisor forces no_new_privs, so sudo
    refuses (documented in docs/security.md); root is available through the API's user="root"."""
    sbx = make_sandbox(runtime_server)
    if _is_runsc(runtime_server):
        with pytest.raises(CommandExitException) as refused:
            sbx.commands.run("sudo -n id -u")
        assert "no new privileges" in refused.value.stderr
        assert sbx.commands.run("id -u", user="root").stdout == "0\n"
    else:
        assert sbx.commands.run("sudo -n id -u").stdout == "0\n"


def test_a_hostile_sh_cannot_stall_signals(runtime_server: ServerProcess, make_sandbox: SandboxFactory) -> None:
    """HostDoS: on runsc a signal reaches a command's process group through `kill` run by the
    sandbox's own /bin/sh. Made endless and chatty (`yes`), it must neither stall the server nor
    stop the timed-out command from being killed."""
    sbx = make_sandbox(runtime_server)
    sbx.commands.run("ln -sf /usr/bin/yes /bin/sh", user="root")
    with pytest.raises(TimeoutException):
        sbx.commands.run("sleep 30", timeout=1.5)
    started = time.monotonic()
    assert sbx.commands.run("echo still-served").stdout == "still-served\n"
    assert time.monotonic() - started < 3
    deadline = time.monotonic() + 10
    while "sleep 30" in sbx.commands.run("ps -eo args").stdout and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "sleep 30" not in sbx.commands.run("ps -eo args").stdout

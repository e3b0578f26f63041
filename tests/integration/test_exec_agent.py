"""The exec agent (native/corral-init.c, corral.node.runtime.agent) in real sandboxes: processes it
starts get exactly what `crun exec` gives, ptys, stdin, signals, exit statuses, clear errors,
concurrency, and a server restart that reconnects."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import subprocess
import tempfile
import time

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from e2b import AsyncSandbox, CommandExitException, Sandbox
from e2b.envd.process import process_pb
from e2b.envd.utils import authentication_header
from e2b.exceptions import SandboxException
from e2b.sandbox.commands.command_handle import PtySize

from corral.node.envd.confined import ConfinedRoot
from corral.node.envd.users import lookup_user
from corral.node.runtime.oci import build_exec_process
from tests.conftest import NEEDS_EXEC_AGENT, TEST_HOME, ServerProcess

pytestmark = [
    pytest.mark.integration,
    NEEDS_EXEC_AGENT,
]

# Everything a process's credentials and confinement are made of (env vars are envd's business).
IDENTITY = (
    "grep -E '^(Uid|Gid|Groups|Cap[A-Za-z]+|NoNewPrivs|Seccomp|Seccomp_filters|Cpus_allowed_list):' /proc/self/status;"
    " cat /proc/self/cgroup; ulimit -a; ulimit -Ha; umask; cat /proc/self/oom_score_adj; id;"
    " for ns in mnt pid net user ipc uts cgroup; do readlink /proc/self/ns/$ns; done"
)


def _init_pid(sandbox_id: str) -> int:
    state = subprocess.run(
        ["crun", "--root", str(TEST_HOME / "runtime"), "state", sandbox_id], capture_output=True, check=True
    )
    return int(json.loads(state.stdout)["pid"])


def _crun_exec(sandbox_id: str, user: str, script: str) -> str:
    """`script` started the way the server did before the agent: `crun exec` with the process
    spec of `build_exec_process`, for the user as envd looks it up."""
    root = ConfinedRoot(
        os.open(f"/proc/{_init_pid(sandbox_id)}/root", os.O_PATH | os.O_DIRECTORY), owns_fd=True
    )
    try:
        ids = lookup_user(root, user)
    finally:
        root.close()
    process = build_exec_process(
        argv=["/bin/bash", "-l", "-c", script], env={"HOME": ids.home, "USER": user}, cwd="/", user=ids,
        pty=None, nofile_hard=resource.getrlimit(resource.RLIMIT_NOFILE)[1],
    )  # fmt: skip
    with tempfile.NamedTemporaryFile("w", suffix=".json") as spec:
        json.dump(process, spec)
        spec.flush()
        done = subprocess.run(
            ["crun", "--root", str(TEST_HOME / "runtime"), "exec", "--process", spec.name, sandbox_id],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
    return done.stdout


def _start_raw(sandbox: Sandbox, **process: object) -> None:
    """Start a process with our own cmd (the SDK always runs bash) and read its first event."""
    request = process_pb.StartRequest(process=process_pb.ProcessConfig(**process))
    headers = authentication_header(sandbox.commands._envd_version, "user")
    events = sandbox.commands._rpc.start(request, headers=headers, timeout_ms=30_000)
    try:
        next(iter(events))
    finally:
        events.close()


def _wait_until_gone(sandbox: Sandbox, pattern: str, seconds: float = 10) -> str:
    deadline = time.monotonic() + seconds
    while True:
        listing = sandbox.commands.run("ps -eo args", user="root").stdout
        if pattern not in listing or time.monotonic() > deadline:
            return listing
        time.sleep(0.1)


def test_pid_1_is_the_agent_and_commands_are_its_children(sbx: Sandbox) -> None:
    assert sbx.commands.run("tr '\\0' ' ' < /proc/1/cmdline").stdout == "/.corral/init "
    assert (
        sbx.commands.run("cut -d' ' -f4 /proc/$$/stat", user="root").stdout.strip() == "1"
    )  # ppid: the agent


@pytest.mark.parametrize("user", ["root", "user"])
def test_credentials_and_limits_are_those_of_crun_exec(sbx: Sandbox, user: str) -> None:
    """Capabilities (root: the sandbox set; others: only the bounding set, so sudo works),
    NoNewPrivs off, the same seccomp filter, groups, cgroup, rlimits, umask and namespaces."""
    by_agent = sbx.commands.run(IDENTITY, user=user, cwd="/").stdout
    assert by_agent == _crun_exec(sbx.sandbox_id, user, IDENTITY)
    status = dict(line.split(":\t", 1) for line in by_agent.splitlines() if ":\t" in line)
    assert status["NoNewPrivs"] == "0" and status["Seccomp"] == "2"
    if user == "user":
        assert status["CapEff"] == status["CapPrm"] == status["CapAmb"] == "0000000000000000"
        assert sbx.commands.run("sudo -n id -u").stdout.strip() == "0"
    else:
        assert status["CapEff"] == status["CapPrm"] == status["CapBnd"] != "0000000000000000"


def test_pty_is_the_sandboxs_own_and_resizes(e2b_env: ServerProcess) -> None:
    async def main() -> str:
        output = bytearray()
        sandbox = await AsyncSandbox.create(timeout=300)
        try:
            handle = await sandbox.pty.create(PtySize(rows=30, cols=100), on_data=output.extend)
            await sandbox.pty.send_stdin(handle.pid, b"tty; stty size\n")
            async with asyncio.timeout(20):
                while b"30 100" not in output:
                    await asyncio.sleep(0.05)
            await sandbox.pty.resize(handle.pid, PtySize(rows=40, cols=120))
            await sandbox.pty.send_stdin(handle.pid, b"stty size; exit\n")
            await handle.wait()
            return output.decode(errors="replace")
        finally:
            await sandbox.kill()

    text = asyncio.run(main())
    assert "/dev/pts/" in text and "40 120" in text, text


def test_stdin_reaches_the_process(sbx: Sandbox) -> None:
    handle = sbx.commands.run("cat; echo done", background=True, stdin=True)
    sbx.commands.send_stdin(handle.pid, "hello ")
    sbx.commands.send_stdin(handle.pid, "agent\n")
    sbx.commands.close_stdin(handle.pid)
    assert handle.wait().stdout == "hello agent\ndone\n"
    assert sbx.commands.run("cat; echo eof").stdout == "eof\n"  # without stdin: /dev/null


def test_exit_codes_and_signals(sbx: Sandbox) -> None:
    with pytest.raises(CommandExitException) as exited:
        sbx.commands.run("exit 7")
    assert exited.value.exit_code == 7
    with pytest.raises(CommandExitException) as signalled:
        sbx.commands.run("kill -TERM $$")
    assert (signalled.value.exit_code, signalled.value.error) == (-1, "signal: terminated")
    with pytest.raises(CommandExitException) as exited_128:  # an exit status is not a signal
        sbx.commands.run("exit 137")
    assert exited_128.value.exit_code == 137


def test_kill_reaches_the_process_group(sbx: Sandbox) -> None:
    handle = sbx.commands.run("sleep 1001 & sleep 1002 & wait", background=True)
    deadline = time.monotonic() + 10
    while "sleep 1002" not in sbx.commands.run("ps -eo args").stdout and time.monotonic() < deadline:
        time.sleep(0.05)
    assert handle.kill()
    with pytest.raises(CommandExitException) as killed:
        handle.wait()
    assert (killed.value.exit_code, killed.value.error) == (-1, "signal: killed")
    listing = _wait_until_gone(sbx, "sleep 100")
    assert "sleep 1001" not in listing and "sleep 1002" not in listing, listing


def test_missing_binary_and_cwd_give_clear_errors(sbx: Sandbox) -> None:
    with pytest.raises(
        ConnectError, match="could not start process '/no/such/program': No such file"
    ) as missing:
        _start_raw(sbx, cmd="/no/such/program")
    assert missing.value.code == Code.INTERNAL
    with pytest.raises(ConnectError, match="could not start process 'no-such-command': No such file"):
        _start_raw(sbx, cmd="no-such-command")
    with pytest.raises(ConnectError, match="cwd '/no/such/dir' does not exist") as no_cwd:
        _start_raw(sbx, cmd="/bin/true", cwd="/no/such/dir")
    assert no_cwd.value.code == Code.INVALID_ARGUMENT
    assert sbx.commands.run("pwd", cwd="/root").stdout == "/root\n"  # as crun exec: chdir before setuid
    assert sbx.commands.run("echo still fine").stdout == "still fine\n"


def test_many_concurrent_execs(e2b_env: ServerProcess) -> None:
    async def main() -> None:
        sandbox = await AsyncSandbox.create(timeout=300)
        try:
            results = await asyncio.gather(
                *(sandbox.commands.run(f"echo {i}; echo {i} >&2") for i in range(60))
            )
            assert [(r.stdout, r.stderr, r.exit_code) for r in results] == [
                (f"{i}\n", f"{i}\n", 0) for i in range(60)
            ]
            zombies = await sandbox.commands.run("ps -eo stat | grep -c '^Z' || true")
            assert zombies.stdout.strip() == "0"
        finally:
            await sandbox.kill()

    asyncio.run(main())


def test_orphans_are_reaped(sbx: Sandbox) -> None:
    sbx.commands.run("(sleep 0.2 &) ; (true &)")  # grandchildren whose parents are gone: init reaps them
    deadline = time.monotonic() + 10  # the sleep has ended (later under load), and init has had a moment
    while time.monotonic() < deadline:
        table = sbx.commands.run("ps -eo stat,args").stdout
        if "sleep 0.2" not in table and not [line for line in table.splitlines() if line.startswith("Z")]:
            break
        time.sleep(0.05)
    assert sbx.commands.run("ps -eo stat,args | grep '^Z' || true").stdout == ""


def test_server_restart_reconnects(e2b_env: ServerProcess) -> None:
    sandbox = Sandbox.create(timeout=300)
    try:
        sandbox.commands.run("sleep 1003", background=True)
        e2b_env.restart(signal.SIGKILL)
        resumed = Sandbox.connect(sandbox.sandbox_id)
        assert resumed.commands.run("echo again").stdout == "again\n"
        assert "sleep 1003" in resumed.commands.run("ps -eo args").stdout  # the agent kept it running
        e2b_env.restart()  # a clean stop, too
        assert Sandbox.connect(sandbox.sandbox_id).commands.run("echo once more").stdout == "once more\n"
    finally:
        sandbox.kill()


def test_waits_end_when_the_sandbox_dies(sbx: Sandbox) -> None:
    handle = sbx.commands.run("sleep 1004", background=True)
    os.kill(_init_pid(sbx.sandbox_id), signal.SIGKILL)  # from the host: the whole sandbox goes
    started = time.monotonic()
    with pytest.raises((CommandExitException, SandboxException)):
        handle.wait()
    assert time.monotonic() - started < 10

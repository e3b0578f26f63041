"""Processes outlive the server that started them (the exec agent keeps them: native/corral-init.c,
corral.node.runtime.agent): after a SIGKILLed server comes back, the official SDK lists them, connects
to them, and gets their further output (also what they wrote while no server ran) and exit codes;
a pty session keeps its terminal; an exit while the server was down is reported."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2b import CommandExitException, Sandbox
from e2b.envd.process import process_pb
from e2b.envd.utils import authentication_header, extract_start_pid
from e2b.sandbox.commands.command_handle import PtySize

from tests.conftest import NEEDS_EXEC_AGENT, TEST_HOME, ServerProcess

pytestmark = [
    pytest.mark.integration,
    NEEDS_EXEC_AGENT,
]


def _start_tagged(sandbox: Sandbox, script: str, tag: str) -> int:
    """Start `bash -c script` with a tag (the SDK's run has none) and no lifetime limit; its pid."""
    request = process_pb.StartRequest(
        process=process_pb.ProcessConfig(cmd="/bin/bash", args=["-c", script]), tag=tag
    )
    headers = authentication_header(sandbox.commands._envd_version, "user")
    events = sandbox.commands._rpc.start(request, headers=headers, timeout_ms=0)
    try:
        return extract_start_pid(next(iter(events)), "start")
    finally:
        events.close()


def _host_processes(argv: list[str]) -> list[int]:
    """Host pids of processes with exactly this command line (sandbox processes are host processes)."""
    wanted = "\0".join(argv) + "\0"
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_text() == wanted:
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def _poll(what: str, check: object, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def _host_path(sandbox: Sandbox, path: str) -> Path:
    """A path in the sandbox's files as the host sees them (its overlay mount)."""
    return TEST_HOME / "sandboxes" / sandbox.sandbox_id / "rootfs" / path.lstrip("/")


def _lines(handle: object) -> Iterator[str]:
    """stdout lines of a command handle as they come."""
    pending = ""
    for stdout, _, _ in handle:  # type: ignore[attr-defined]
        if stdout:
            pending += stdout
            *complete, pending = pending.split("\n")
            yield from complete


def test_background_command_streams_on_after_sigkill(e2b_env: ServerProcess, sbx: Sandbox) -> None:
    script = "for i in $(seq 1 120); do echo line $i; sleep 0.05; done; exit 3"
    handle = sbx.commands.run(script, background=True, timeout=0)
    seen_before = 0
    for line in _lines(handle):
        seen_before = int(line.split()[1])
        if seen_before >= 5:
            break
    e2b_env.restart(signal.SIGKILL)

    resumed = Sandbox.connect(sbx.sandbox_id)
    later = resumed.commands.connect(handle.pid, timeout=0)
    numbers = [int(line.split()[1]) for line in _lines(later)]
    assert numbers, "no output after the restart"
    # What the old server had read but not sent is lost; from then on nothing is missing.
    assert numbers[0] > seen_before and numbers == list(range(numbers[0], 121)), numbers
    with pytest.raises(CommandExitException) as exited:
        later.wait()
    assert exited.value.exit_code == 3


def test_output_written_while_the_server_is_down_blocks_then_arrives(
    e2b_env: ServerProcess, sbx: Sandbox
) -> None:
    """2 MB (more than the pipe holds: 64 KiB by default, 1 MiB here) written while no server
    runs: the writer blocks on the full pipe (it gets no EPIPE, it is not killed) and goes on."""
    go = "/tmp/go-write"
    handle = sbx.commands.run(
        f"while [ ! -e {go} ]; do sleep 0.05; done; seq 1 300000; exit 4", background=True, timeout=0
    )
    e2b_env.stop(signal.SIGKILL)
    _host_path(sbx, go).touch()

    def writer_blocked() -> bool:
        pids = _host_processes(["seq", "1", "300000"])
        return bool(pids) and Path(f"/proc/{pids[0]}/wchan").read_text().endswith("pipe_write")

    _poll("seq blocks on its full pipe", writer_blocked)
    e2b_env.start()

    later = Sandbox.connect(sbx.sandbox_id).commands.connect(handle.pid, timeout=0)
    with pytest.raises(CommandExitException) as exited:
        later.wait()
    assert exited.value.exit_code == 4
    assert exited.value.stdout == "".join(f"{i}\n" for i in range(1, 300001))


def test_exit_while_the_server_is_down_is_reported(e2b_env: ServerProcess, sbx: Sandbox) -> None:
    go = "/tmp/go-exit"
    handle = sbx.commands.run(
        f"while [ ! -e {go} ]; do sleep 0.05; done; echo finished; exit 6", background=True, timeout=0
    )
    tagged = _start_tagged(sbx, "sleep 1000", "keeper")
    e2b_env.stop(signal.SIGKILL)
    _host_path(sbx, go).touch()
    _poll("the command exits", lambda: not _runs_in(sbx, handle.pid))
    e2b_env.start()

    resumed = Sandbox.connect(sbx.sandbox_id)
    listed = {p.pid: p for p in resumed.commands.list()}
    assert handle.pid not in listed  # it ended
    assert listed[tagged].tag == "keeper" and listed[tagged].args == ["-c", "sleep 1000"]
    later = resumed.commands.connect(handle.pid, timeout=0)
    with pytest.raises(CommandExitException) as exited:
        later.wait()
    assert (exited.value.exit_code, exited.value.stdout) == (6, "finished\n")


def _runs_in(sandbox: Sandbox, pid: int) -> bool:
    """Whether the sandbox's process `pid` (in its pid namespace) still runs, seen from the host."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            nspid = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
            if len(nspid) > 1 and nspid[-1] == str(pid) and sandbox.sandbox_id in _cgroup(entry):
                return True
    return False


def _cgroup(entry: Path) -> str:
    try:
        return (entry / "cgroup").read_text()
    except OSError:
        return ""


def test_list_shows_surviving_processes_with_their_tags(e2b_env: ServerProcess, sbx: Sandbox) -> None:
    pids = {tag: _start_tagged(sbx, f"sleep 100{i}", tag) for i, tag in enumerate(("alpha", "beta"))}
    plain = sbx.commands.run("sleep 1009", background=True, timeout=0, cwd="/tmp", envs={"SEEN": "yes"})
    before = {p.pid: p for p in sbx.commands.list()}
    e2b_env.restart(signal.SIGKILL)

    resumed = Sandbox.connect(sbx.sandbox_id)
    after = {p.pid: p for p in resumed.commands.list()}
    for pid in (*pids.values(), plain.pid):
        assert (after[pid].cmd, after[pid].args, after[pid].tag, after[pid].cwd, after[pid].envs) == (
            before[pid].cmd, before[pid].args, before[pid].tag, before[pid].cwd, before[pid].envs,
        )  # fmt: skip
    assert {after[pid].tag for pid in pids.values()} == {"alpha", "beta"}
    assert after[plain.pid].envs == {"SEEN": "yes"}
    assert resumed.commands.kill(pids["alpha"])  # a signal still reaches it
    _poll(
        "the killed process is no longer listed",
        lambda: pids["alpha"] not in {p.pid for p in resumed.commands.list()},
    )
    assert "sleep 1001" in resumed.commands.run("ps -eo args").stdout


def test_pty_session_survives_and_echoes(e2b_env: ServerProcess, sbx: Sandbox) -> None:
    terminal = sbx.pty.create(PtySize(rows=24, cols=80), timeout=0)
    sbx.pty.send_stdin(terminal.pid, b"export PS1='$ '; echo ready-$((1 + 1))\n")
    _read_pty_until(terminal, b"ready-2")
    e2b_env.restart(signal.SIGKILL)

    resumed = Sandbox.connect(sbx.sandbox_id)
    session = resumed.pty.connect(terminal.pid, timeout=0)
    resumed.pty.send_stdin(terminal.pid, b"echo still-$((6 * 7))\n")
    _read_pty_until(session, b"still-42")
    resumed.pty.resize(terminal.pid, PtySize(rows=33, cols=99))
    resumed.pty.send_stdin(terminal.pid, b"stty size; exit 5\n")
    text = _read_pty_until(session, b"33 99")
    assert b"hangup" not in text.lower()
    with pytest.raises(CommandExitException) as exited:
        session.wait()
    assert exited.value.exit_code == 5


def _read_pty_until(handle: object, needle: bytes) -> bytes:
    seen = b""
    for _, _, pty in handle:  # type: ignore[attr-defined]
        if pty:
            seen += pty
            if needle in seen:
                return seen
    raise AssertionError(f"{needle!r} never came: {seen!r}")


def test_lifetime_limit_holds_across_a_restart(e2b_env: ServerProcess, sbx: Sandbox) -> None:
    started = time.monotonic()
    handle = sbx.commands.run("sleep 1000", background=True, timeout=8)
    e2b_env.restart(signal.SIGKILL)
    later = Sandbox.connect(sbx.sandbox_id).commands.connect(handle.pid, timeout=0)
    with pytest.raises(CommandExitException) as killed:
        later.wait()
    assert killed.value.error == "signal: killed"
    assert 7 < time.monotonic() - started < 20


def test_processes_of_a_frozen_sandbox_come_back_on_resume(e2b_env: ServerProcess, sbx: Sandbox) -> None:
    """Frozen across a clean stop: its agent answers only once thawed, and the resume hands over."""
    pid = _start_tagged(sbx, "for i in $(seq 1 40); do echo tick $i; sleep 0.05; done; exit 2", "ticker")
    sbx.pause()
    e2b_env.restart()  # Ctrl-C this time

    resumed = Sandbox.connect(sbx.sandbox_id)  # resumes it
    assert {p.tag for p in resumed.commands.list() if p.pid == pid} == {"ticker"}
    later = resumed.commands.connect(pid, timeout=0)
    with pytest.raises(CommandExitException) as exited:
        later.wait()
    assert exited.value.exit_code == 2 and "tick 40\n" in exited.value.stdout

"""Attacks on the exec agent, the sandbox's PID 1 that starts its processes (native/corral-init.c).

Sandbox root must not reach the agent's channel (its listening socket and connections: fds of
PID 1), its memory, or its executable, and must not be able to stop it from serving the host.
"""

from __future__ import annotations

import json
import signal
import time

import pytest
from e2b import Sandbox
from e2b.exceptions import NotFoundException

from corral.core.settings import load_settings
from tests.conftest import NEEDS_EXEC_AGENT, ServerProcess
from tests.security._probes import run, run_python, sha256_file
from tests.security.conftest import SandboxFactory, sdk_opts

pytestmark = [
    pytest.mark.integration,
    NEEDS_EXEC_AGENT,
]

PROBE = r"""
import ctypes, errno, json, os
found = {}
def attempt(name, action):
    try:
        found[name] = ("ok", repr(action())[:80])
    except OSError as e:
        found[name] = ("denied", errno.errorcode.get(e.errno, e.errno))
attempt("list fds", lambda: os.listdir("/proc/1/fd"))
for fd in range(0, 12):
    attempt(f"open fd {fd}", lambda: os.close(os.open(f"/proc/1/fd/{fd}", os.O_RDONLY)))
    attempt(f"readlink fd {fd}", lambda: os.readlink(f"/proc/1/fd/{fd}"))
attempt("mem", lambda: os.close(os.open("/proc/1/mem", os.O_RDWR)))
attempt("environ", lambda: open("/proc/1/environ", "rb").read())
attempt("maps", lambda: open("/proc/1/maps").read())
attempt("exe", lambda: os.readlink("/proc/1/exe"))
attempt("root", lambda: os.listdir("/proc/1/root"))
attempt("cwd", lambda: os.listdir("/proc/1/cwd"))
attempt("write init", lambda: open("/.corral/init", "r+b").write(b"x"))
libc = ctypes.CDLL(None, use_errno=True)
def ptrace_attach():
    if libc.ptrace(16, 1, 0, 0) != 0:  # PTRACE_ATTACH
        raise OSError(ctypes.get_errno(), "ptrace")
attempt("ptrace", ptrace_attach)
def pidfd_getfd():
    pidfd = os.pidfd_open(1)
    fd = libc.syscall(438, pidfd, 3, 0)  # pidfd_getfd(pidfd, 3, 0)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "pidfd_getfd")
attempt("pidfd_getfd", pidfd_getfd)
found["unix sockets"] = [line.split()[-1] for line in open("/proc/net/unix").read().splitlines()[1:] if len(line.split()) > 7]
print(json.dumps(found))
"""


def test_sandbox_root_cannot_reach_the_agent(
    corral_server: ServerProcess, make_sandbox: SandboxFactory
) -> None:
    """PID 1 is not dumpable: no fd, memory, environment, maps or exe of it through /proc, no
    ptrace or pidfd_getfd (the latter two are also outside the seccomp allowlist); its socket path
    is on the host and in the host's network namespace, so no listing inside shows it."""
    sbx = make_sandbox()
    assert run(sbx, "tr '\\0' ' ' < /proc/1/cmdline").stdout == "/.corral/init "
    found = run_python(sbx, PROBE)
    assert isinstance(found, dict)
    reached = {name: result for name, result in found.items() if name != "unix sockets" and result[0] == "ok"}
    # Listing /proc/1/fd shows numbers only (allowed to the owner of /proc/1 in a user namespace).
    reached.pop("list fds", None)
    assert reached == {}, reached
    assert not [path for path in found["unix sockets"] if "agent" in path], found["unix sockets"]


def test_signals_to_pid_1_leave_the_sandbox_working(
    corral_server: ServerProcess, make_sandbox: SandboxFactory
) -> None:
    """PID 1 of a pid namespace gets no signal from inside that it does not handle, and the agent
    handles none (SIGCHLD only wakes its reaper)."""
    sbx = make_sandbox()
    attack = "; ".join(
        f"kill -{sig} 1"
        for sig in ("KILL", "TERM", "INT", "HUP", "QUIT", "SEGV", "ABRT", "USR1", "PIPE", "CHLD", "STOP")
    )
    run(sbx, attack)
    run(sbx, "kill -9 -1")  # everything it can reach, envd's processes included
    deadline = time.monotonic() + 10
    while True:
        try:
            assert run(sbx, "echo alive").stdout == "alive\n"
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert run(sbx, "grep State /proc/1/status").stdout.split()[1] in ("S", "R")
    assert run(sbx, "sleep 0.1 & wait; echo reaped").stdout == "reaped\n"


def test_agent_binary_is_read_only_and_intact(
    corral_server: ServerProcess, make_sandbox: SandboxFactory
) -> None:
    binary = load_settings().init_binary
    before = sha256_file(binary)
    sbx = make_sandbox()
    attack = run(
        sbx,
        "cp /bin/true /.corral/init; echo x >> /.corral/init; rm -f /.corral/init; mount -o remount,rw /.corral/init; echo done",
    )
    assert attack.stdout.endswith("done\n")
    assert sha256_file(binary) == before
    assert run(sbx, "tr '\\0' ' ' < /proc/1/cmdline").stdout == "/.corral/init "
    assert run(sbx, "echo still").stdout == "still\n"


# Runs in the background while the server is down, when the agent holds processes nobody owns:
# it tries every way a sandbox process could reach the agent's channel or the kept pipe ends.
TAKEOVER = r"""
import ctypes, errno, json, os, socket, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
ADOPT = struct.pack("=II", 3, 1)
found = {"pid 1 fds": [], "answers": [], "own fds": sorted(os.listdir("/proc/self/fd"))}
def sockets():
    for line in open("/proc/net/unix").read().splitlines()[1:]:
        parts = line.split()
        if len(parts) > 7 and parts[7].startswith("@"):
            yield "\0" + parts[7][1:]
    for top in ("/", "/tmp", "/run", "/var", "/dev", "/.corral"):
        for root, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if os.path.join(root, d) not in ("/proc", "/sys")]
            for name in files:
                path = os.path.join(root, name)
                try:
                    if os.path.exists(path) and (os.stat(path).st_mode & 0o170000) == 0o140000:
                        yield path
                except OSError:
                    pass
def ask(address):
    for kind in (socket.SOCK_SEQPACKET, socket.SOCK_STREAM):
        try:
            with socket.socket(socket.AF_UNIX, kind) as s:
                s.settimeout(0.5)
                s.connect(address)
                s.send(ADOPT)
                data, fds, _, _ = socket.recv_fds(s, 1 << 16, 8)
                if fds or data[:4] in (struct.pack("=I", 16), struct.pack("=I", 20)):
                    found["answers"].append([address, len(data), len(fds)])
        except OSError:
            pass
deadline = time.monotonic() + float(sys.argv[1])
while time.monotonic() < deadline:
    for fd in range(0, 64):
        try:
            os.close(os.open(f"/proc/1/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK))
            found["pid 1 fds"].append(["open", fd])
        except OSError:
            pass
        try:
            pidfd = os.pidfd_open(1)
            got = libc.syscall(438, pidfd, fd, 0)  # pidfd_getfd
            os.close(pidfd)
            if got >= 0:
                found["pid 1 fds"].append(["pidfd_getfd", fd])
        except OSError:
            pass
    for address in set(sockets()):
        ask(address)
    time.sleep(0.1)
with open("/tmp/takeover.part", "w") as out:
    json.dump(found, out)
os.rename("/tmp/takeover.part", "/tmp/takeover.json")
"""


def test_sandbox_root_cannot_take_over_processes_while_the_server_is_down(
    corral_server: ServerProcess, make_sandbox: SandboxFactory
) -> None:
    """While no server runs, the agent holds the ends of processes nobody owns, until a connection
    on its socket asks for them (ADOPT). It trusts every connection there, so only host root may
    make one: sandbox root, probing all the while, reaches neither the socket nor PID 1's fds,
    inherits no kept end, and the restarted server gets the victim back intact."""
    sbx = make_sandbox()
    victim = sbx.commands.run("cat", background=True, stdin=True, user="user", timeout=0)
    sbx.files.write("/tmp/takeover.py", TAKEOVER, user="root")
    sbx.commands.run("python3 /tmp/takeover.py 6", background=True, user="root", timeout=0)
    time.sleep(1)  # the probe is under way
    corral_server.restart(signal.SIGKILL)

    resumed = Sandbox.connect(sbx.sandbox_id, **sdk_opts(corral_server))
    assert victim.pid in {p.pid for p in resumed.commands.list()}
    deadline = time.monotonic() + 30
    while True:
        try:
            found = json.loads(resumed.files.read("/tmp/takeover.json"))
            break
        except NotFoundException:
            assert time.monotonic() < deadline, "the probe never finished"
            time.sleep(0.2)
    assert found["answers"] == [] and found["pid 1 fds"] == [], found
    assert found["own fds"] == ["0", "1", "2", "3"], found  # stdio, and the fd listing itself
    stream = resumed.commands.connect(victim.pid, timeout=0)
    resumed.commands.send_stdin(victim.pid, "still mine\n")
    resumed.commands.close_stdin(victim.pid)
    assert stream.wait().stdout == "still mine\n"

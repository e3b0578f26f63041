"""A sandbox that exhausts a resource hurts only itself (gVisor classes HostDoS / PeerDoS, attacker =
SandboxUser or SandboxRoot).

Each attack runs in a fresh sandbox while a neighbour sandbox keeps running `true`: the neighbour's
median exec latency during the attack must stay within 2x of its median just before (with a small
absolute floor, `LATENCY_FLOOR_S`, for a busy CI machine), the server keeps answering, and a host
oracle shows the attack hit the sandbox's own limit: its pids, memory, cpu quota, disk image size.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox, SandboxException

from tests.conftest import TEST_BRIDGE, TEST_HOME, ServerProcess
from tests.security._probes import run
from tests.security.conftest import (
    DEFAULT_RUNTIME,
    LATENCY_SAMPLES,
    SandboxFactory,
    exec_latencies,
    latency_bound,
    median,
)

pytestmark = [pytest.mark.integration, pytest.mark.compat]


def _cgroup(controller: str, sandbox_id: str) -> Path:
    return Path("/sys/fs/cgroup") / controller / f"corral-{TEST_BRIDGE}" / sandbox_id


def _read_int(path: Path) -> int:
    return int(path.read_text().split()[0])


def _under_attack(
    server: ServerProcess,
    neighbour: Sandbox,
    attacker: Sandbox,
    start: str,
    *,
    user: str = "user",
    warmup_s: float = 2.0,
    during: Callable[[], None] | None = None,
) -> tuple[float, float]:
    """Start `start` in the attacker (in the background), then measure the neighbour; returns the
    (quiet, loaded) medians after asserting the bound and that the server answers."""
    exec_latencies(neighbour, 2)  # warm the path
    quiet = median(exec_latencies(neighbour, LATENCY_SAMPLES))
    attacker.commands.run(start, background=True, user=user, timeout=0)
    time.sleep(warmup_s)
    if during is not None:
        during()
    loaded = median(exec_latencies(neighbour, LATENCY_SAMPLES))
    health = httpx.get(f"{server.url}/health", timeout=10)
    assert health.status_code == 200
    print(f"neighbour exec median: quiet {quiet * 1000:.0f} ms, under attack {loaded * 1000:.0f} ms")
    assert loaded <= latency_bound(quiet), f"neighbour slowed from {quiet:.3f}s to {loaded:.3f}s"
    return quiet, loaded


def test_cpu_hog(corral_server: ServerProcess, neighbour: Sandbox, make_sandbox: SandboxFactory) -> None:
    """PeerDoS/HostDoS: more busy loops than the sandbox has CPUs; its cgroup's CFS quota caps it."""
    attacker = make_sandbox()
    quota = _read_int(_cgroup("cpu", attacker.sandbox_id) / "cpu.cfs_quota_us")
    period = _read_int(_cgroup("cpu", attacker.sandbox_id) / "cpu.cfs_period_us")
    assert 0 < quota, "no CPU quota on the sandbox"
    usage = _cgroup("cpuacct", attacker.sandbox_id) / "cpuacct.usage"
    marks: list[tuple[float, int]] = []
    _under_attack(
        corral_server,
        neighbour,
        attacker,
        "for i in 1 2 3 4 5 6; do (while :; do :; done) & done; wait",
        during=lambda: marks.append((time.monotonic(), _read_int(usage))),
    )
    (t0, u0), t1, u1 = marks[0], time.monotonic(), _read_int(usage)
    used_cpus = (u1 - u0) / 1e9 / (t1 - t0)
    assert used_cpus <= quota / period * 1.15 + 0.05, f"{used_cpus:.2f} CPUs used, quota {quota / period}"


def test_fork_bomb(corral_server: ServerProcess, neighbour: Sandbox, make_sandbox: SandboxFactory) -> None:
    """HostDoS/PeerDoS: a fork bomb stops at the sandbox's pids limit (every process it makes is in
    the sandbox's cgroup, so the host's pid space loses at most that), and the sandbox can still be
    killed cleanly."""
    attacker = make_sandbox()
    pids = _cgroup("pids", attacker.sandbox_id)
    limit = _read_int(pids / "pids.max")
    peak: list[int] = []
    _under_attack(
        corral_server,
        neighbour,
        attacker,
        "bomb() { bomb | bomb & }; bomb",
        warmup_s=4.0,
        during=lambda: peak.append(_read_int(pids / "pids.current")),
    )
    peak.append(_read_int(pids / "pids.current"))
    assert max(peak) <= limit
    # On runsc, processes are not host tasks: the cgroup counts the Sentry's threads, and the bomb
    # ends at gVisor's own limits or with the Sentry OOM-killed (the whole sandbox dies, contained
    # as in test_memory_bomb); the neighbour's latency is the check there.
    if DEFAULT_RUNTIME != "runsc":
        assert max(peak) > 100, "the bomb never got going: the test proved nothing"
    attacker.kill()
    deadline = time.monotonic() + 30  # the kill answers before the teardown is done
    while pids.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pids.exists(), "the sandbox's processes outlived its kill"


def test_memory_bomb(corral_server: ServerProcess, neighbour: Sandbox, make_sandbox: SandboxFactory) -> None:
    """HostDoS/PeerDoS: allocating far beyond the memory limit gets the allocating process
    OOM-killed inside the sandbox; the host keeps its memory and the sandbox keeps answering. (On
    runsc the Sentry is one host process and the kernel's OOM killer ends the whole sandbox: it
    dies cleanly, which is also contained — SelfDoS.)"""
    attacker = make_sandbox()
    memory = _cgroup("memory", attacker.sandbox_id)
    limit = _read_int(memory / "memory.limit_in_bytes")
    available_before = _meminfo("MemAvailable")
    bomb = 'while :; do python3 -c "b = []\nwhile True: b.append(bytearray(64 << 20))" 2>/dev/null; done'
    _under_attack(corral_server, neighbour, attacker, bomb, warmup_s=3.0)
    assert _read_int(memory / "memory.max_usage_in_bytes") <= limit
    failcnt = _read_int(memory / "memory.failcnt")
    assert failcnt > 0, "the bomb never reached the limit: the test proved nothing"
    assert _meminfo("MemAvailable") > available_before - limit - (512 << 20)
    if DEFAULT_RUNTIME == "runsc":
        with contextlib.suppress(SandboxException):
            assert run(attacker, "echo alive").stdout == "alive\n"
    else:
        assert run(attacker, "echo alive").stdout == "alive\n"


def test_disk_fill(corral_server: ServerProcess, neighbour: Sandbox, make_sandbox: SandboxFactory) -> None:
    """HostDoS/PeerDoS: filling the disk ends with ENOSPC at the sandbox's own disk size; the host
    file system loses at most that much and the neighbour can still write."""
    attacker = make_sandbox()
    host_free_before = _free_bytes(TEST_HOME)
    size = int(run(attacker, "df --output=size -B1 / | tail -1").stdout)
    assert 0 < size < host_free_before / 4, f"sandbox disk {size} is not a small private disk"
    over = run(attacker, f"fallocate -l {size * 2} /home/user/huge 2>&1; echo rc=$?", user="user")
    assert "rc=0" not in over.stdout and "No space" in over.stdout
    _under_attack(
        corral_server,
        neighbour,
        attacker,
        "fallocate -l $(( $(df --output=avail -B1 /home/user | tail -1) - 4096 )) /home/user/fill;"
        " dd if=/dev/zero of=/home/user/more bs=1M 2>/dev/null; dd if=/dev/zero of=/tmp/more bs=1M 2>/dev/null; sleep 60",
    )
    full = run(attacker, "echo x > /home/user/one-more 2>&1; echo rc=$?", user="user").stdout
    assert "rc=0" not in full, "the sandbox disk is not full"
    assert _free_bytes(TEST_HOME) > host_free_before - size - (256 << 20)
    neighbour.files.write("/tmp/still-writable", "yes")
    assert neighbour.files.read("/tmp/still-writable") == "yes"


def test_inode_exhaustion(
    corral_server: ServerProcess, neighbour: Sandbox, make_sandbox: SandboxFactory
) -> None:
    """HostDoS/PeerDoS: creating files until no inode is left stops at the sandbox's own file
    system; the host's inode count is untouched and the neighbour can still create files."""
    attacker = make_sandbox()
    inodes = int(run(attacker, "df --output=iavail / | tail -1").stdout)
    assert 0 < inodes < 2_000_000, f"{inodes} free inodes: not a private file system"
    host_inodes_before = os.statvfs(TEST_HOME).f_favail
    script = (
        "import os\n"
        "os.makedirs('/home/user/many', exist_ok=True)\n"
        "n = 0\n"
        "try:\n"
        f"    while n < {inodes + 10_000}:\n"
        "        os.close(os.open(f'/home/user/many/{n}', os.O_CREAT | os.O_WRONLY, 0o600))\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print('stopped', n, e.errno)\n"
    )
    attacker.files.write("/home/user/inodes.py", script)
    _under_attack(
        corral_server,
        neighbour,
        attacker,
        "python3 /home/user/inodes.py > /home/user/inodes.out 2>&1",
        warmup_s=3.0,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "stopped" not in run(attacker, "cat /home/user/inodes.out").stdout:
        time.sleep(1)
    out = run(attacker, "cat /home/user/inodes.out").stdout
    assert "stopped" in out and out.split()[-1] == "28", out  # ENOSPC
    # other work on this host makes files too: a leak would cost the host ~`inodes`, not a few thousand
    assert os.statvfs(TEST_HOME).f_favail > host_inodes_before - inodes // 4
    neighbour.files.write("/tmp/inode-ok", "yes")
    assert neighbour.files.read("/tmp/inode-ok") == "yes"


def _meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize

"""Resources and what pausing, snapshots and kills do on the host: cpuset, memory limit, the per-sandbox
disk, the freezer, whiteouts in snapshot layers, layer collection, and that nothing is left behind."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2b import CommandExitException, Sandbox

from tests import gvisor
from tests.conftest import TEST_BRIDGE, TEST_HOME, ServerProcess
from tests.integration.test_sandbox_lifecycle import _host_traces

pytestmark = pytest.mark.integration

SMALL = "life-small"  # 1 CPU, 256 MiB, 64 MiB disk, base's layers
CGROUPS = Path("/sys/fs/cgroup")


@pytest.fixture(scope="module")
def small_template(e2b_env: ServerProcess) -> Iterator[str]:
    from corral.core.settings import load_settings
    from corral.node.storage.templates import TemplateManifest, TemplateStore

    store = TemplateStore(load_settings({"home": TEST_HOME}, env={}))
    base = store.get("base")
    store.save(
        TemplateManifest(
            template_id=SMALL, names=(), layers=base.layers, cpu_count=1, memory_mb=256, disk_size_mb=64
        )
    )
    yield SMALL
    store.delete(SMALL)


def _cgroup(controller: str, sandbox_id: str) -> Path:
    return CGROUPS / controller / f"corral-{TEST_BRIDGE}" / sandbox_id


def _loop_devices(sandbox_id: str) -> list[str]:
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if sandbox_id in line]


def _eventually(check, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    """Poll `check()` until it returns something falsy (or time is up); its last value. A kill answers
    before its teardown has finished."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if not value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def _gone(sandbox_id: str) -> list[str]:
    """What is left of a killed sandbox on the host, once its teardown had time to finish."""
    return _eventually(lambda: _host_traces(sandbox_id) + _loop_devices(sandbox_id))


@gvisor.CGROUPFS
def test_cpu_and_memory_allotment_is_what_the_sandbox_sees(small_template: str) -> None:
    small = Sandbox.create(small_template, timeout=60)
    big = Sandbox.create(timeout=60)
    try:
        out = small.commands.run(
            "nproc; grep -c ^processor /proc/cpuinfo; cat /sys/devices/system/cpu/online;"
            " python3 -c 'import os; print(os.cpu_count())'; cat /sys/fs/cgroup/memory/memory.limit_in_bytes"
        ).stdout.split()
        assert out == ["1", "1", "0", "1", str(256 * 1024 * 1024)]
        expected = str(min(2, os.cpu_count() or 1))
        assert big.commands.run("nproc").stdout.strip() == expected
        with pytest.raises(CommandExitException):  # more than its memory: the kernel kills it
            small.commands.run("python3 -c 'b = bytearray(400 * 1024 * 1024); print(len(b))'", timeout=30)
        assert small.is_running()
    finally:
        small.kill()
        big.kill()


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two host CPUs")
def test_one_cpu_sandboxes_spread_over_host_cpus(small_template: str) -> None:
    a = Sandbox.create(small_template, timeout=60)
    b = Sandbox.create(small_template, timeout=60)
    try:
        cpus = {(_cgroup("cpuset", s.sandbox_id) / "cpuset.cpus").read_text().strip() for s in (a, b)}
        assert len(cpus) == 2
    finally:
        a.kill()
        b.kill()


def test_disk_limit_is_enospc_inside_and_spares_the_host(small_template: str) -> None:
    sbx = Sandbox.create(small_template, timeout=60)
    try:
        host_free = os.statvfs(TEST_HOME).f_bavail * os.statvfs(TEST_HOME).f_frsize
        with pytest.raises(CommandExitException) as info:
            sbx.commands.run("dd if=/dev/zero of=/home/user/fill bs=1M count=200", timeout=60)
        assert "No space left on device" in info.value.stderr
        size = int(sbx.commands.run("stat -c %s /home/user/fill").stdout)
        assert 40 * 2**20 < size < 64 * 2**20
        host_free_after = os.statvfs(TEST_HOME).f_bavail * os.statvfs(TEST_HOME).f_frsize
        assert host_free - host_free_after < 100 * 2**20  # the host lost at most what the image holds
        metric = sbx.get_metrics()[-1]
        assert 48 * 2**20 < metric.disk_total <= 64 * 2**20  # the image, less ext4's own metadata
        sbx.commands.run("rm /home/user/fill && echo again > /home/user/ok")
        assert sbx.files.read("/home/user/ok") == "again\n"
    finally:
        sbx.kill()
    assert _gone(sbx.sandbox_id) == []


def test_frozen_sandbox_uses_no_cpu(e2b_env: ServerProcess) -> None:
    sbx = Sandbox.create(timeout=60)
    try:
        sbx.commands.run("while :; do :; done", background=True)
        usage = _cgroup("cpuacct", sbx.sandbox_id) / "cpuacct.usage"
        sbx.pause()
        if not gvisor.RUNSC:  # runsc pauses with `runsc pause`, not the freezer (see node/runtime/runtimes.py)
            assert (_cgroup("freezer", sbx.sandbox_id) / "freezer.state").read_text().strip() == "FROZEN"
        before = int(usage.read_text())
        time.sleep(0.5)
        # A paused gVisor Sentry still runs its Go runtime's timers: well under 1% of a CPU.
        assert int(usage.read_text()) - before <= (5_000_000 if gvisor.RUNSC else 0)
        sbx.connect()
        deadline = time.monotonic() + 10  # the resumed loop runs again (soon, however loaded)
        while int(usage.read_text()) <= before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert int(usage.read_text()) > before
    finally:
        sbx.kill()


@pytest.mark.parametrize("keep_memory", [True, False], ids=["frozen", "stopped"])
def test_killing_a_paused_sandbox_leaves_nothing_behind(e2b_env: ServerProcess, keep_memory: bool) -> None:
    sbx = Sandbox.create(timeout=60)
    sbx.commands.run("sleep 1000", background=True)
    sbx.pause(keep_memory=keep_memory)
    assert (TEST_HOME / "sandboxes" / sbx.sandbox_id / "disk.img").exists()
    assert _loop_devices(sbx.sandbox_id)
    assert sbx.kill() is True
    assert _gone(sbx.sandbox_id) == []


def test_snapshot_layer_keeps_whiteouts_and_is_removed_when_unused(e2b_env: ServerProcess) -> None:
    sbx = Sandbox.create(timeout=60)
    layers = TEST_HOME / "layers"
    try:
        sbx.commands.run(
            "rm /etc/debian_version && rm -rf /etc/apt && mkdir /etc/apt && echo mine > /etc/apt/only",
            user="root",
        )
        before = {p.name for p in layers.iterdir()}
        snapshot = sbx.create_snapshot()
        (new_layer,) = {p.name for p in layers.iterdir()} - before
        whiteout = os.lstat(layers / new_layer / "etc" / "debian_version")
        assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
        assert os.getxattr(layers / new_layer / "etc" / "apt", "trusted.overlay.opaque") == b"y"

        copy = Sandbox.create(snapshot.snapshot_id, timeout=60)
        assert copy.commands.run("ls /etc/apt; ls /etc/debian_version 2>&1 || true").stdout == (
            "only\nls: cannot access '/etc/debian_version': No such file or directory\n"
        )
        assert Sandbox.delete_snapshot(snapshot.snapshot_id)
        assert (layers / new_layer).is_dir()  # still used by `copy`
        copy.kill()
        assert not _eventually(lambda: (layers / new_layer).exists())
    finally:
        sbx.kill()

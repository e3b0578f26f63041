"""The OCI config's resources for lifecycle work: cpuset, quota within it, and kernel files bound over."""

from __future__ import annotations

import pytest

from corral.node.runtime.oci import BOOT_ID_PATH, CPU_ONLINE_PATH, CPUINFO_PATH, build_sandbox_config


def _config(**overrides):
    args = {
        "sandbox_id": "abc123",
        "rootfs": "/x/rootfs",
        "netns_path": "/var/run/netns/corral0-abc123",
        "init_binary": "/usr/bin/catatonit",
        "etc_files": {},
        "cpu_count": 2,
        "memory_mb": 512,
        "pids_limit": 4096,
        "nofile_hard": 20000,
        "cgroups_path": "/corral-corral0/abc123",
    }
    args.update(overrides)
    return build_sandbox_config(**args)


def test_cpuset_and_quota_follow_the_allotted_cpus() -> None:
    cpu = _config(cpu_count=2, cpus=(1, 2))["linux"]["resources"]["cpu"]
    assert cpu["cpus"] == "1-2" and cpu["quota"] == 2 * cpu["period"]
    cpu = _config(cpu_count=4, cpus=(0, 1))["linux"]["resources"]["cpu"]
    assert cpu["quota"] == 2 * cpu["period"]  # never more quota than CPUs to run on
    cpu = _config(cpu_count=2)["linux"]["resources"]["cpu"]
    assert "cpus" not in cpu and cpu["quota"] == 2 * cpu["period"]


def test_memory_limit() -> None:
    assert _config(memory_mb=256)["linux"]["resources"]["memory"]["limit"] == 256 * 1024 * 1024


def test_virtual_files_are_bound_read_only_after_proc_and_sys() -> None:
    files = {BOOT_ID_PATH: "/s/boot_id", CPUINFO_PATH: "/s/cpuinfo", CPU_ONLINE_PATH: "/s/cpu_online"}
    mounts = _config(virtual_files=files)["mounts"]
    destinations = [m["destination"] for m in mounts]
    for dest, source in files.items():
        mount = mounts[destinations.index(dest)]
        assert mount["type"] == "bind" and mount["source"] == source and "ro" in mount["options"]
        assert destinations.index(dest) > destinations.index("/proc") and destinations.index(
            dest
        ) > destinations.index("/sys")


def test_only_known_kernel_files_can_be_replaced() -> None:
    with pytest.raises(ValueError):
        _config(virtual_files={"/etc/shadow": "/tmp/x"})

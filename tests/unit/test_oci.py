"""The OCI config a sandbox gets: isolation defaults that must never silently go away."""

from __future__ import annotations

from corral.node.runtime.base import PtySize, UserIds
from corral.node.runtime.oci import INIT_PATH, build_exec_process, build_sandbox_config

FORBIDDEN_CAPS = {"CAP_SYS_ADMIN", "CAP_SYS_MODULE", "CAP_SYS_PTRACE", "CAP_NET_RAW", "CAP_NET_ADMIN", "CAP_SYS_TIME", "CAP_MKNOD"}


def _config(**overrides):
    args = {
        "sandbox_id": "abc123",
        "rootfs": "/x/rootfs",
        "netns_path": "/var/run/netns/corral0-abc123",
        "init_binary": "/usr/bin/catatonit",
        "etc_files": {"/etc/resolv.conf": "/x/etc/resolv.conf", "/etc/hosts": "/x/etc/hosts"},
        "cpu_count": 2,
        "memory_mb": 512,
        "pids_limit": 4096,
        "nofile_hard": 20000,
        "cgroups_path": "/corral-corral0/abc123",
    }
    args.update(overrides)
    return build_sandbox_config(**args)


def test_namespaces_and_hostname() -> None:
    config = _config()
    kinds = {ns["type"]: ns for ns in config["linux"]["namespaces"]}
    assert set(kinds) == {"pid", "network", "ipc", "uts", "mount", "cgroup"}
    assert kinds["network"]["path"] == "/var/run/netns/corral0-abc123"
    assert config["hostname"] == "abc123"


def test_init_is_a_reaper_bound_read_only() -> None:
    config = _config()
    assert config["process"]["args"] == [INIT_PATH, "-P"]
    init_mount = next(m for m in config["mounts"] if m["destination"] == INIT_PATH)
    assert init_mount["source"] == "/usr/bin/catatonit" and "ro" in init_mount["options"]


def test_limits() -> None:
    resources = _config(cpu_count=3, memory_mb=1024, pids_limit=100)["linux"]["resources"]
    assert resources["memory"]["limit"] == 1024 * 1024 * 1024
    assert resources["cpu"]["quota"] == 3 * resources["cpu"]["period"]
    assert resources["pids"]["limit"] == 100
    assert resources["devices"][0] == {"allow": False, "access": "rwm"}


def test_rlimits_stay_within_host_hard_limit() -> None:
    for hard in (1024, 20000, 1 << 30):
        (nofile,) = _config(nofile_hard=hard)["process"]["rlimits"]
        assert nofile["hard"] <= hard and nofile["soft"] <= nofile["hard"]


def test_no_dangerous_capabilities_and_masked_paths() -> None:
    config = _config()
    for kind, caps in config["process"]["capabilities"].items():
        assert not FORBIDDEN_CAPS & set(caps), kind
    assert "/proc/kcore" in config["linux"]["maskedPaths"]
    assert "/proc/sysrq-trigger" in config["linux"]["readonlyPaths"]
    assert not any(m["source"].startswith("/dev/kvm") for m in config["mounts"])


def test_etc_files_are_bound_over_the_template() -> None:
    mounts = {m["destination"]: m for m in _config()["mounts"]}
    assert mounts["/etc/resolv.conf"]["source"] == "/x/etc/resolv.conf"
    assert mounts["/etc/hosts"]["type"] == "bind"


def test_exec_process_for_user_has_no_effective_capabilities() -> None:
    user = UserIds(name="user", uid=1000, gid=1000, home="/home/user", groups=(1000, 27))
    process = build_exec_process(argv=["/bin/bash", "-l", "-c", "id"], env={"A": "1"}, cwd="/home/user", user=user, pty=None, nofile_hard=20000)
    assert process["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [1000, 27]}
    assert set(process["capabilities"]) == {"bounding"}
    assert process["env"] == ["A=1"] and process["terminal"] is False


def test_exec_process_with_pty() -> None:
    root = UserIds(name="root", uid=0, gid=0, home="/root")
    process = build_exec_process(argv=["bash"], env={}, cwd="/", user=root, pty=PtySize(cols=100, rows=30), nofile_hard=20000)
    assert process["terminal"] is True
    assert process["consoleSize"] == {"height": 30, "width": 100}
    assert "CAP_CHOWN" in process["capabilities"]["effective"]

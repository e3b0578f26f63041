"""OCI runtime configs as data: `build_sandbox_config` for a sandbox's init and `build_exec_process`
for every process envd starts in it. Pure functions; nothing here touches the host.

Isolation defaults (why each is there):
- namespaces pid, mount, network (pre-made netns), uts (hostname = sandbox id), ipc, cgroup;
- capabilities: the small set a Linux user expects from a sandbox where `sudo` works (chown, setuid,
  kill, bind low ports …) but never SYS_ADMIN, SYS_MODULE, SYS_PTRACE, NET_RAW, NET_ADMIN, SYS_TIME, MKNOD;
- masked and read-only /proc and /sys paths as runc does;
- a seccomp allowlist at least as strict as Docker's default (`corral.node.runtime.seccomp`);
- no_new_privs off for processes envd starts, so setuid keeps working, because `sudo` must work
  in a sandbox as it does in E2B's (see docs/security.md for what stops a runtime escape); on for
  catatonit, which never execs, and off for Corral's exec agent (`exec_agent`), whose children
  are those processes (no_new_privs is inherited and can never be cleared);
- rlimits kept within the host's hard limits (no CAP_SYS_RESOURCE here);
- cpu/memory/pids limits in the sandbox's own cgroup; with `cpus`, a cpuset pins the sandbox to
  those host CPUs (so `nproc` inside counts them) and the CFS quota never exceeds them;
- `virtual_files`: host files bound read-only over kernel files whose answer must be the
  sandbox's own: `/proc/sys/kernel/random/boot_id` (one per boot of the sandbox, so a cold boot
  changes it and a freeze does not), `/proc/cpuinfo` and `/sys/devices/system/cpu/online` (the
  allotted CPUs only). crun mounts them after /proc and /sys, over the kernel's files;
- `statx_shim` (runsc only, `corral.node.runtime.statx_shim`): the host's statx shim bound
  read-only beside the init; its /etc/ld.so.preload comes in `etc_files` like /etc/hosts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from corral.node.cgroups.cpuset import format_cpuset
from corral.node.runtime.base import PtySize, UserIds
from corral.node.runtime.idmap import IdMap
from corral.node.runtime.seccomp import seccomp_profile
from corral.node.runtime.statx_shim import SHIM_PATH

__all__ = [
    "BOOT_ID_PATH",
    "CPUINFO_PATH",
    "CPU_ONLINE_PATH",
    "INIT_PATH",
    "SANDBOX_CAPABILITIES",
    "build_exec_process",
    "build_sandbox_config",
]

# The init bind-mounted read-only from the host: Corral's exec agent (native/corral-init.c), or
# catatonit run as `init -P` for runtimes that cannot pass it our socket (runsc).
INIT_PATH = "/.corral/init"
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
CPUINFO_PATH = "/proc/cpuinfo"
CPU_ONLINE_PATH = "/sys/devices/system/cpu/online"
_VIRTUAL_FILE_PATHS = frozenset({BOOT_ID_PATH, CPUINFO_PATH, CPU_ONLINE_PATH})

SANDBOX_CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_AUDIT_WRITE",
    "CAP_SETFCAP",
)

_MASKED_PATHS = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
# null, zero, full, random, urandom, tty, ptmx: what crun creates in the sandbox's /dev.
_DEVICES = ((1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 2))
_READONLY_PATHS = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)


def _capabilities() -> dict[str, list[str]]:
    caps = list(SANDBOX_CAPABILITIES)
    return {"bounding": caps, "effective": caps, "permitted": caps}


def _rlimits(nofile_hard: int) -> list[dict[str, Any]]:
    nofile = min(nofile_hard, 1 << 20)
    return [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": min(nofile, 16384)}]


def build_sandbox_config(
    *,
    sandbox_id: str,
    rootfs: str,
    netns_path: str,
    init_binary: str,
    etc_files: Mapping[str, str],
    cpu_count: int,
    memory_mb: int,
    pids_limit: int,
    nofile_hard: int,
    cgroups_path: str,
    cpus: Sequence[int] | None = None,
    virtual_files: Mapping[str, str] | None = None,
    id_map: IdMap | None = None,
    exec_agent: bool = False,
    statx_shim: str | None = None,
) -> dict[str, Any]:
    """The config.json of a sandbox container whose PID 1 is a reaper that never exits.

    `etc_files` maps sandbox paths (/etc/hosts, /etc/resolv.conf, /etc/hostname) to host files bound
    over them; the runtime resolves mount destinations inside the rootfs, so a template cannot redirect
    them to the host with symlinks. `virtual_files` maps paths in `BOOT_ID_PATH`, `CPUINFO_PATH` and
    `CPU_ONLINE_PATH` to host files bound over them; `cpus` (host CPU numbers) becomes the cpuset.
    `id_map` runs the sandbox in a user namespace with that mapping (see `corral.node.runtime.idmap`).
    `exec_agent`: `init_binary` is Corral's exec agent, which starts the sandbox's processes
    (`corral.node.runtime.agent`); otherwise catatonit, and processes come from `<runtime> exec`.
    `statx_shim`: the host file bound read-only at `SHIM_PATH` (gVisor sandboxes).
    """
    virtual_files = dict(virtual_files or {})
    unknown = set(virtual_files) - _VIRTUAL_FILE_PATHS
    if unknown:
        raise ValueError(f"not a virtualised kernel file: {sorted(unknown)}")
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        {
            "destination": "/sys/fs/cgroup",
            "type": "cgroup",
            "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
        },
        {"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=755"]},
        {"destination": INIT_PATH, "type": "bind", "source": init_binary, "options": ["rbind", "ro", "nosuid", "nodev"]},
    ]
    if statx_shim is not None:
        mounts.append({"destination": SHIM_PATH, "type": "bind", "source": statx_shim, "options": ["bind", "ro", "nosuid", "nodev"]})
    for dest, source in sorted(etc_files.items()):
        mounts.append({"destination": dest, "type": "bind", "source": source, "options": ["rbind", "ro", "nosuid", "nodev"]})
    for dest, source in sorted(virtual_files.items()):
        mounts.append({"destination": dest, "type": "bind", "source": source, "options": ["bind", "ro", "nosuid", "nodev", "noexec"]})
    cpu_period = 100_000
    cpu: dict[str, Any] = {"quota": cpu_count * cpu_period, "period": cpu_period}
    if cpus:
        cpu["quota"] = min(cpu_count, len(set(cpus))) * cpu_period
        cpu["cpus"] = format_cpuset(cpus)
    config: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": [INIT_PATH] if exec_agent else [INIT_PATH, "-P"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "capabilities": _capabilities(),
            "rlimits": _rlimits(nofile_hard),
            # The exec agent's children must be able to gain privileges (sudo) as `crun exec`'s
            # can; catatonit never execs anything.
            "noNewPrivileges": not exec_agent,
            "oomScoreAdj": 0,
        },
        "root": {"path": rootfs, "readonly": False},
        "hostname": sandbox_id,
        "mounts": mounts,
        "linux": {
            "namespaces": [
                {"type": "pid"},
                {"type": "network", "path": netns_path},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
                {"type": "cgroup"},
            ],
            "cgroupsPath": cgroups_path,
            "resources": {
                "devices": [{"allow": False, "access": "rwm"}]
                + [{"allow": True, "type": "c", "major": ma, "minor": mi, "access": "rwm"} for ma, mi in _DEVICES]
                + [{"allow": True, "type": "c", "major": 136, "access": "rwm"}],  # /dev/pts/*
                "memory": {"limit": memory_mb * 1024 * 1024},
                "cpu": cpu,
                "pids": {"limit": pids_limit},
            },
            "maskedPaths": list(_MASKED_PATHS),
            "readonlyPaths": list(_READONLY_PATHS),
            "seccomp": seccomp_profile(),
        },
    }
    if id_map is not None:
        config["linux"]["namespaces"].append({"type": "user"})
        config["linux"]["uidMappings"] = id_map.oci_mappings()
        config["linux"]["gidMappings"] = id_map.oci_mappings()
    return config


def build_exec_process(
    *,
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str,
    user: UserIds,
    pty: PtySize | None,
    nofile_hard: int,
) -> dict[str, Any]:
    """The `process` object for `crun exec --process`: same capabilities and limits as the sandbox."""
    process: dict[str, Any] = {
        "terminal": pty is not None,
        "user": {"uid": user.uid, "gid": user.gid, "additionalGids": list(user.groups)},
        "args": list(argv),
        "env": [f"{k}={v}" for k, v in env.items()],
        "cwd": cwd,
        "capabilities": _capabilities() if user.uid == 0 else {"bounding": list(SANDBOX_CAPABILITIES)},
        "rlimits": _rlimits(nofile_hard),
        "noNewPrivileges": False,
    }
    if pty is not None:
        process["consoleSize"] = {"height": pty.rows, "width": pty.cols}
    return process

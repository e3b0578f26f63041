"""The seccomp profile as data: an allowlist at least as strict as Docker's default, never loosened."""

from __future__ import annotations

import errno

import pytest

from corral.node.runtime.oci import build_exec_process, build_sandbox_config
from corral.node.runtime.seccomp import (
    AF_VSOCK,
    ALLOWED_PERSONALITIES,
    ALLOWED_SYSCALLS,
    BLOCKED_SYSCALLS,
    NAMESPACE_CLONE_FLAGS,
    seccomp_profile,
)

# What the brief (and Docker's profile, and then some) require to stay out of the allowlist.
MUST_BE_BLOCKED = {
    "io_uring_setup", "io_uring_enter", "io_uring_register", "keyctl", "add_key", "request_key", "bpf",
    "perf_event_open", "userfaultfd", "kexec_load", "kexec_file_load", "open_by_handle_at", "init_module",
    "finit_module", "delete_module", "mount", "umount2", "pivot_root", "move_mount", "open_tree", "fsopen",
    "fsmount", "fsconfig", "fspick", "mount_setattr", "unshare", "setns", "ptrace", "process_vm_readv",
    "process_vm_writev", "kcmp", "pidfd_getfd", "swapon", "swapoff", "reboot", "settimeofday", "clock_settime",
    "acct", "iopl", "ioperm", "syslog", "quotactl", "lookup_dcookie", "fanotify_init", "sethostname",
    "setdomainname", "vhangup", "mbind", "set_mempolicy",
}  # fmt: skip


def _rules(profile: dict, name: str) -> list[dict]:
    return [rule for rule in profile["syscalls"] if name in rule["names"]]


def test_default_is_errno_eperm_and_native_arch_only() -> None:
    profile = seccomp_profile("x86_64")
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    assert profile["defaultErrnoRet"] == errno.EPERM
    assert profile["architectures"] == ["SCMP_ARCH_X86_64"]  # no x86/x32 compat syscalls


def test_dangerous_syscalls_are_not_allowed_anywhere() -> None:
    assert MUST_BE_BLOCKED <= BLOCKED_SYSCALLS
    assert not BLOCKED_SYSCALLS & ALLOWED_SYSCALLS
    for arch in ("x86_64", "aarch64"):
        profile = seccomp_profile(arch)
        allowed = {
            n for rule in profile["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW" for n in rule["names"]
        }
        assert not allowed & MUST_BE_BLOCKED, allowed & MUST_BE_BLOCKED


def test_clone_only_without_namespace_flags_and_clone3_is_enosys() -> None:
    profile = seccomp_profile("x86_64")
    (clone,) = _rules(profile, "clone")
    (arg,) = clone["args"]
    assert arg["op"] == "SCMP_CMP_MASKED_EQ" and arg["index"] == 0 and arg.get("valueTwo", 0) == 0
    assert (
        arg["value"] == NAMESPACE_CLONE_FLAGS == 0x7E020000
    )  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
    (clone3,) = _rules(profile, "clone3")
    assert clone3["action"] == "SCMP_ACT_ERRNO" and clone3["errnoRet"] == errno.ENOSYS


def test_personality_and_socket_argument_rules() -> None:
    profile = seccomp_profile("x86_64")
    personality = _rules(profile, "personality")
    assert sorted(r["args"][0]["value"] for r in personality) == sorted(ALLOWED_PERSONALITIES)
    assert all(r["args"][0]["op"] == "SCMP_CMP_EQ" for r in personality)
    assert 0x0400000 not in ALLOWED_PERSONALITIES  # READ_IMPLIES_EXEC
    (sock,) = _rules(profile, "socket")
    assert sock["args"] == [{"index": 0, "value": AF_VSOCK, "op": "SCMP_CMP_NE"}]


def test_everyday_syscalls_are_allowed() -> None:
    needed = {
        "read", "write", "openat", "execve", "clone", "wait4", "mmap", "futex", "epoll_wait", "socket", "connect",
        "setuid", "setgid", "setgroups", "capset", "prctl", "chroot", "statx", "getdents64", "ioctl", "rseq",
        "memfd_create", "pidfd_open", "openat2", "close_range", "faccessat2", "mknodat",
    }  # fmt: skip
    profile = seccomp_profile("x86_64")
    names = {n for rule in profile["syscalls"] for n in rule["names"]}
    assert needed <= names
    assert {"arch_prctl", "modify_ldt"} <= names  # x86-64 TLS and LDT
    assert "arch_prctl" not in {n for rule in seccomp_profile("aarch64")["syscalls"] for n in rule["names"]}


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(ValueError):
        seccomp_profile("mips")


def test_every_sandbox_and_exec_carries_the_profile_and_init_has_no_new_privs() -> None:
    config = build_sandbox_config(
        sandbox_id="abc", rootfs="/r", netns_path="/n", init_binary="/i", etc_files={}, cpu_count=1,
        memory_mb=64, pids_limit=64, nofile_hard=1024, cgroups_path="/c/abc",
    )  # fmt: skip
    assert config["linux"]["seccomp"] == seccomp_profile()
    assert config["process"]["noNewPrivileges"] is True
    # exec'd processes inherit the container's filter from the runtime; sudo needs no_new_privs off
    from corral.node.runtime.base import UserIds

    process = build_exec_process(
        argv=["true"], env={}, cwd="/", user=UserIds(name="user", uid=1000, gid=1000, home="/home/user"), pty=None,
        nofile_hard=1024,
    )  # fmt: skip
    assert process["noNewPrivileges"] is False

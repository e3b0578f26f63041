"""The seccomp profile every sandbox gets, as data (the OCI `linux.seccomp` object). Pure.

An allowlist: any syscall not named here fails with EPERM. The list is our own, written from the
syscalls Docker's default profile documents as allowed for a container without CAP_SYS_ADMIN,
then made stricter:

- io_uring_setup/enter/register are not allowed (a large, often-exploited kernel surface; Docker
  dropped them in 2023 too);
- ptrace, process_vm_readv/writev, kcmp, pidfd_getfd and process_madvise are not allowed (Docker
  allows the first three on kernels >= 4.8); strace and gdb do not work inside a sandbox;
- only the native ABI is allowed: 32-bit (x86, x32) syscalls are refused, Docker accepts them;
- what CAP_SYS_ADMIN, CAP_SYS_MODULE, CAP_SYS_PTRACE, CAP_SYS_TIME, CAP_SYS_BOOT, CAP_SYS_RAWIO,
  CAP_SYS_NICE, CAP_SYSLOG, CAP_BPF and CAP_PERFMON would unlock stays blocked: the sandbox never
  has those capabilities (see `corral.node.runtime.oci`), so the kernel would refuse most of these
  anyway; the filter is the second wall and also closes the calls that need no capability at all
  (keyctl, add_key, request_key, userfaultfd, unshare(CLONE_NEWUSER), …).

Argument rules (the same as Docker's):
- `clone` only without namespace flags (CLONE_NEWNS|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET|NEWCGROUP);
- `clone3` fails with ENOSYS (its flags live in memory a filter cannot read), so libc falls back to
  `clone`;
- `unshare` and `setns` are not allowed at all;
- `personality` only with the values programs use (Linux, READ_IMPLIES_EXEC, ADDR_NO_RANDOMIZE
  and their combination, and the 0xffffffff query);
- `socket` for every family except AF_VSOCK (the hypervisor socket).

`SANDBOX_CAN` lists what a sandbox must still be able to do with the profile (sudo, ptys, pip,
npm, gcc, git, ps, top …); the integration suite checks that list against a real sandbox.
"""

from __future__ import annotations

import errno
import platform
from typing import Any

__all__ = [
    "ALLOWED_SYSCALLS",
    "BLOCKED_SYSCALLS",
    "NAMESPACE_CLONE_FLAGS",
    "ALLOWED_PERSONALITIES",
    "AF_VSOCK",
    "SANDBOX_CAN",
    "seccomp_profile",
]

# Every syscall a sandbox may make without an argument rule. Names that do not exist on the host's
# architecture are skipped by the runtime's libseccomp, so one list serves amd64 and arm64.
ALLOWED_SYSCALLS: frozenset[str] = frozenset(
    """
    accept accept4 access adjtimex alarm bind brk cachestat capget capset chdir chmod chown chroot
    clock_adjtime clock_getres clock_gettime clock_nanosleep close close_range connect
    copy_file_range creat dup dup2 dup3 epoll_create epoll_create1 epoll_ctl epoll_pwait
    epoll_pwait2 epoll_wait eventfd eventfd2 execve execveat exit exit_group faccessat faccessat2
    fadvise64 fallocate fanotify_mark fchdir fchmod fchmodat fchmodat2 fchown fchownat fcntl
    fdatasync fgetxattr flistxattr flock fork fremovexattr fsetxattr fstat fstatfs fsync ftruncate
    futex futex_waitv futex_wake futimesat getcpu getcwd getdents getdents64 getegid geteuid getgid
    getgroups getitimer getpeername getpgid getpgrp getpid getppid getpriority getrandom getresgid
    getresuid getrlimit get_robust_list getrusage getsid getsockname getsockopt get_thread_area
    gettid gettimeofday getuid getxattr inotify_add_watch inotify_init inotify_init1
    inotify_rm_watch io_cancel ioctl io_destroy io_getevents io_pgetevents ioprio_get ioprio_set
    io_setup io_submit kill landlock_add_rule landlock_create_ruleset landlock_restrict_self lchown
    lgetxattr link linkat listen listxattr llistxattr lremovexattr lseek lsetxattr lstat madvise
    map_shadow_stack membarrier memfd_create memfd_secret mincore mkdir mkdirat mknod mknodat mlock
    mlock2 mlockall mmap mprotect mq_getsetattr mq_notify mq_open mq_timedreceive mq_timedsend
    mq_unlink mremap msgctl msgget msgrcv msgsnd msync munlock munlockall munmap name_to_handle_at
    nanosleep newfstatat open openat openat2 pause pidfd_open pidfd_send_signal pipe pipe2
    pkey_alloc pkey_free pkey_mprotect poll ppoll prctl pread64 preadv preadv2 prlimit64
    process_mrelease pselect6 pwrite64 pwritev pwritev2 read readahead readlink readlinkat readv
    recvfrom recvmmsg recvmsg remap_file_pages removexattr rename renameat renameat2
    restart_syscall rmdir rseq rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo
    rt_sigreturn rt_sigsuspend rt_sigtimedwait rt_tgsigqueueinfo sched_getaffinity sched_getattr
    sched_getparam sched_get_priority_max sched_get_priority_min sched_getscheduler
    sched_rr_get_interval sched_setaffinity sched_setattr sched_setparam sched_setscheduler
    sched_yield seccomp select semctl semget semop semtimedop sendfile sendmmsg sendmsg sendto
    setfsgid setfsuid setgid setgroups setitimer setpgid setpriority setregid setresgid setresuid
    setreuid setrlimit set_robust_list setsid setsockopt set_thread_area set_tid_address setuid
    setxattr shmat shmctl shmdt shmget shutdown sigaltstack signalfd signalfd4 socketpair splice
    stat statfs statx symlink symlinkat sync sync_file_range syncfs sysinfo tee tgkill time
    timer_create timer_delete timer_getoverrun timer_gettime timer_settime timerfd_create
    timerfd_gettime timerfd_settime times tkill truncate umask uname unlink unlinkat utime
    utimensat utimes vfork vmsplice wait4 waitid write writev
    """.split()
)

# Allowed only on one architecture (x86-64's TLS and LDT setup; arm64 has neither).
_ARCH_SYSCALLS: dict[str, frozenset[str]] = {
    "x86_64": frozenset({"arch_prctl", "modify_ldt"}),
    "aarch64": frozenset(),
}
_ARCHITECTURES = {"x86_64": "SCMP_ARCH_X86_64", "aarch64": "SCMP_ARCH_AARCH64"}

# Refused on purpose (documentation and the unit test's oracle: none of these may ever be allowed).
BLOCKED_SYSCALLS: frozenset[str] = frozenset(
    """
    acct add_key bpf clock_settime clone3 create_module delete_module fanotify_init finit_module
    fsconfig fsmount fsopen fspick get_kernel_syms get_mempolicy init_module io_uring_enter
    io_uring_register io_uring_setup ioperm iopl kcmp kexec_file_load kexec_load keyctl
    lookup_dcookie mbind mount mount_setattr move_mount nfsservctl open_by_handle_at open_tree
    perf_event_open pidfd_getfd pivot_root process_madvise process_vm_readv process_vm_writev
    ptrace query_module quotactl quotactl_fd reboot request_key set_mempolicy setdomainname
    sethostname setns settimeofday swapoff swapon syslog sysfs umount umount2 unshare uselib
    userfaultfd ustat vhangup _sysctl
    """.split()
)

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACE_CLONE_FLAGS = (
    CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET
)
# PER_LINUX, PER_LINUX32, UNAME26, PER_LINUX32|UNAME26 and 0xffffffff (which only reads the
# current value). Everything else (READ_IMPLIES_EXEC, ADDR_NO_RANDOMIZE, MMAP_PAGE_ZERO …) is refused.
ALLOWED_PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)
AF_VSOCK = 40

# Programs whose everyday use the profile must not break (checked in tests/security).
SANDBOX_CAN = ("bash", "python3", "node", "pip install", "npm install", "git", "sudo", "gcc", "ps", "top", "pty")


def _rule(names: list[str], action: str = "SCMP_ACT_ALLOW", **extra: Any) -> dict[str, Any]:
    return {"names": names, "action": action, **extra}


def seccomp_profile(arch: str | None = None) -> dict[str, Any]:
    """The OCI seccomp object for a sandbox on `arch` (`platform.machine()` by default)."""
    arch = arch or platform.machine()
    if arch not in _ARCHITECTURES:
        raise ValueError(f"no seccomp profile for architecture {arch!r}")
    allowed = sorted(ALLOWED_SYSCALLS | _ARCH_SYSCALLS[arch])
    rules = [
        _rule(allowed),
        _rule(
            ["clone"],
            args=[{"index": 0, "value": NAMESPACE_CLONE_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
        ),
        _rule(["clone3"], "SCMP_ACT_ERRNO", errnoRet=errno.ENOSYS),
        _rule(["socket"], args=[{"index": 0, "value": AF_VSOCK, "op": "SCMP_CMP_NE"}]),
    ]
    # One rule per value: the conditions inside a rule are AND-ed, separate rules are OR-ed.
    for value in ALLOWED_PERSONALITIES:
        rules.append(_rule(["personality"], args=[{"index": 0, "value": value, "op": "SCMP_CMP_EQ"}]))
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": errno.EPERM,
        "architectures": [_ARCHITECTURES[arch]],
        "syscalls": rules,
    }

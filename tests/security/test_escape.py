"""Sandbox root cannot act on the host kernel (gVisor classes Escape / HostDoS, attacker = SandboxRoot).

Every test runs as root inside a real sandbox (what `sudo` gives any sandbox user) and checks a host
oracle afterwards: the host's sysctls, core_pattern, cgroup release agents, loaded modules and the
runtime binary are unchanged. The host-oracle tests run on every runtime (crun, and runsc when it is
installed); the seccomp and capability tests check the profile crun applies.
"""

from __future__ import annotations

import contextlib
import errno
import json
import re
import time
from pathlib import Path

import httpx
import pytest
from e2b import CommandExitException, NotFoundException, PtySize, SandboxException

from corral.core.settings import load_settings
from corral.node.runtime.oci import SANDBOX_CAPABILITIES
from tests.conftest import ServerProcess
from tests.security._probes import host_text, run, run_python, runtime_binary, sha256_file
from tests.security.conftest import DEFAULT_RUNTIME, SandboxFactory

pytestmark = [pytest.mark.integration, pytest.mark.compat]

_CAP_NUMBERS = {
    "CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3, "CAP_FSETID": 4,
    "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8, "CAP_LINUX_IMMUTABLE": 9,
    "CAP_NET_BIND_SERVICE": 10, "CAP_NET_BROADCAST": 11, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13,
    "CAP_IPC_LOCK": 14, "CAP_IPC_OWNER": 15, "CAP_SYS_MODULE": 16, "CAP_SYS_RAWIO": 17,
    "CAP_SYS_CHROOT": 18, "CAP_SYS_PTRACE": 19, "CAP_SYS_PACCT": 20, "CAP_SYS_ADMIN": 21,
    "CAP_SYS_BOOT": 22, "CAP_SYS_NICE": 23, "CAP_SYS_RESOURCE": 24, "CAP_SYS_TIME": 25,
    "CAP_SYS_TTY_CONFIG": 26, "CAP_MKNOD": 27, "CAP_LEASE": 28, "CAP_AUDIT_WRITE": 29,
    "CAP_AUDIT_CONTROL": 30, "CAP_SETFCAP": 31, "CAP_MAC_OVERRIDE": 32, "CAP_MAC_ADMIN": 33,
    "CAP_SYSLOG": 34, "CAP_WAKE_ALARM": 35, "CAP_BLOCK_SUSPEND": 36, "CAP_AUDIT_READ": 37,
    "CAP_PERFMON": 38, "CAP_BPF": 39, "CAP_CHECKPOINT_RESTORE": 40,
}  # fmt: skip
FORBIDDEN_CAPS = {
    "CAP_SYS_ADMIN", "CAP_SYS_MODULE", "CAP_SYS_PTRACE", "CAP_NET_RAW", "CAP_NET_ADMIN", "CAP_SYS_TIME",
    "CAP_MKNOD", "CAP_SYS_RAWIO", "CAP_SYS_BOOT", "CAP_DAC_READ_SEARCH", "CAP_BPF", "CAP_PERFMON",
    "CAP_SYSLOG", "CAP_SYS_RESOURCE", "CAP_LINUX_IMMUTABLE", "CAP_MAC_ADMIN", "CAP_MAC_OVERRIDE",
}  # fmt: skip


def _caps(mask_hex: str) -> set[str]:
    mask = int(mask_hex, 16)
    return {name for name, bit in _CAP_NUMBERS.items() if mask >> bit & 1}


def _status(text: str) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


@pytest.fixture
def crun_only() -> None:
    if DEFAULT_RUNTIME != "crun":
        pytest.skip("checks the profile crun applies")


# -- host kernel state, on every runtime --------------------------------------------------------


def test_proc_sys_sysrq_and_core_pattern_are_read_only(
    runtime_server: ServerProcess, make_sandbox: SandboxFactory
) -> None:
    """Escape/HostDoS: /proc/sys writes, /proc/sysrq-trigger and core_pattern (the classic
    "pipe a core dump into a host program" escape) fail as sandbox root; the host's values stay."""
    watched = [
        "/proc/sys/kernel/core_pattern",
        "/proc/sys/kernel/sysrq",
        "/proc/sys/vm/drop_caches",
        "/proc/sys/kernel/modprobe",
        "/proc/sys/kernel/hostname",
    ]
    before = {p: host_text(p) for p in watched if p != "/proc/sys/vm/drop_caches"}
    sbx = make_sandbox(runtime_server)
    out = run(
        sbx,
        "for f in kernel/core_pattern kernel/sysrq vm/drop_caches kernel/modprobe kernel/hostname; do"
        " (echo '|/tmp/pwn %p' > /proc/sys/$f) 2>/dev/null && echo WROTE $f; done;"
        " (echo c > /proc/sysrq-trigger) 2>/dev/null && echo WROTE sysrq-trigger;"
        " sysctl -w kernel.core_pattern='|/tmp/pwn' >/dev/null 2>&1 && echo WROTE sysctl; echo done",
    )
    assert out.stdout.strip().endswith("done")
    assert "WROTE" not in out.stdout, out.stdout
    assert {p: host_text(p) for p in before} == before
    assert run(sbx, "echo alive").stdout == "alive\n"


def test_cgroup_release_agent_cve_2022_0492(
    runtime_server: ServerProcess, make_sandbox: SandboxFactory
) -> None:
    """Escape (CVE-2022-0492, cgroup v1 here): sandbox root can neither mount a cgroup v1 hierarchy
    nor write any release_agent or notify_on_release; every host release_agent stays as it was."""
    agents = sorted(str(p) for p in Path("/sys/fs/cgroup").glob("*/release_agent"))
    assert agents, "no cgroup v1 hierarchies on this host: the oracle would be empty"
    before = {p: host_text(p) for p in agents}
    sbx = make_sandbox(runtime_server)
    out = run(
        sbx,
        "mkdir -p /tmp/cg; for c in rdma memory pids cpu; do"
        " mount -t cgroup -o $c cgroup /tmp/cg 2>/dev/null && echo MOUNTED $c && umount /tmp/cg; done;"
        " for f in /sys/fs/cgroup/*/release_agent /sys/fs/cgroup/release_agent; do"
        " [ -e $f ] && (echo /tmp/pwn > $f) 2>/dev/null && echo WROTE $f; done;"
        " for f in /sys/fs/cgroup/*/notify_on_release; do (echo 1 > $f) 2>/dev/null && echo WROTE $f; done;"
        " unshare -UrmC true 2>/dev/null && echo UNSHARED; echo done",
    )
    assert out.stdout.strip().endswith("done"), out.stderr
    assert "MOUNTED" not in out.stdout and "WROTE" not in out.stdout and "UNSHARED" not in out.stdout, (
        out.stdout
    )
    assert {p: host_text(p) for p in agents} == before


def test_mounts_and_modules(runtime_server: ServerProcess, make_sandbox: SandboxFactory) -> None:
    """Escape: no mount of any kind (tmpfs, bind of /, proc, a block device) and no module loading
    (init_module, finit_module, delete_module); the host's module list is unchanged."""
    modules_before = sorted(line.split()[0] for line in host_text("/proc/modules").splitlines())
    sbx = make_sandbox(runtime_server)
    out = run(
        sbx,
        "mkdir -p /tmp/m; mount -t tmpfs none /tmp/m 2>/dev/null && echo MOUNTED tmpfs;"
        " mount --bind / /tmp/m 2>/dev/null && echo MOUNTED bind;"
        " mount -t proc proc /tmp/m 2>/dev/null && echo MOUNTED proc;"
        " mount /dev/vda /tmp/m 2>/dev/null && echo MOUNTED vda; echo done",
    )
    assert "MOUNTED" not in out.stdout and out.stdout.strip().endswith("done"), out.stdout
    results = run_python(
        sbx,
        "import ctypes, json, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "img = ctypes.create_string_buffer(b'\\x7fELF' + bytes(60))\n"
        "fd = os.open('/bin/true', os.O_RDONLY)\n"
        "calls = {'init_module': (175, img, 64, b''), 'finit_module': (313, fd, b'', 0),\n"
        "         'delete_module': (176, b'ext4', 0)}\n"
        "out = {}\n"
        "for name, args in calls.items():\n"
        "    rc = libc.syscall(*args)\n"
        "    out[name] = 0 if rc == 0 else ctypes.get_errno()\n"
        "print(json.dumps(out))\n",
    )
    assert results == {"init_module": errno.EPERM, "finit_module": errno.EPERM, "delete_module": errno.EPERM}
    assert sorted(line.split()[0] for line in host_text("/proc/modules").splitlines()) == modules_before


def test_no_host_devices(runtime_server: ServerProcess, make_sandbox: SandboxFactory) -> None:
    """Escape/HostLeak: /dev holds only the harmless character devices; no /dev/kvm, no disks, and
    root cannot make device nodes (no CAP_MKNOD, devices cgroup denies the rest)."""
    sbx = make_sandbox(runtime_server)
    listing = run(sbx, "ls -A /dev")
    assert listing.exit_code == 0, listing.stderr
    names = set(listing.stdout.split())
    allowed = {"null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm", "mqueue", "console",
               "fd", "stdin", "stdout", "stderr", "core", "net"}  # fmt: skip
    if runtime_server.env.get("CORRAL_RUNTIME", DEFAULT_RUNTIME) == "runsc":
        allowed.add("fuse")  # gVisor's own FUSE, served by the Sentry: no host device behind it
    assert "null" in names and names <= allowed, names - allowed
    assert "kvm" not in names
    out = run(
        sbx,
        "mknod /tmp/vda b 253 0 2>/dev/null && echo MADE vda; mknod /tmp/kvm c 10 232 2>/dev/null && echo MADE kvm;"
        " mknod /tmp/mem c 1 1 2>/dev/null && echo MADE mem; head -c1 /dev/kvm >/dev/null 2>&1 && echo READ kvm;"
        " mkfifo /tmp/fifo && echo fifo-ok",
    )
    assert "MADE" not in out.stdout and "READ" not in out.stdout, out.stdout
    assert "fifo-ok" in out.stdout  # FIFOs and sockets are not devices: they must keep working


def test_runtime_binary_stays_intact_cve_2019_5736(
    runtime_server: ServerProcess, make_sandbox: SandboxFactory
) -> None:
    """Escape (CVE-2019-5736): sandbox root turns /bin/sh into `#!/proc/self/exe` (so the runtime's
    next exec runs the runtime itself inside the sandbox) while a loop tries to open every
    /proc/*/exe for writing; the host's runtime binary and init keep their hashes."""
    runtime = "runsc" if runtime_server.env.get("CORRAL_RUNTIME") == "runsc" else DEFAULT_RUNTIME
    inits = (Path("/usr/bin/catatonit"), load_settings().init_binary)  # the exec agent is PID 1 on crun
    binaries = [runtime_binary(runtime)] + [p for p in inits if p.exists()]
    before = {str(p): sha256_file(p) for p in binaries}
    sbx = make_sandbox(runtime_server)
    sbx.files.write(
        "/tmp/overwrite.py",
        "import json, os, time\n"
        "opened = set()\n"
        "end = time.time() + 6\n"
        "while time.time() < end:\n"
        "    for pid in os.listdir('/proc'):\n"
        "        if not pid.isdigit() and pid != 'self':\n"
        "            continue\n"
        "        try:\n"
        "            target = os.readlink(f'/proc/{pid}/exe')\n"
        "            fd = os.open(f'/proc/{pid}/exe', os.O_WRONLY)\n"
        "        except OSError:\n"
        "            continue\n"
        "        os.close(fd)\n"
        "        opened.add((target, os.path.isfile(target)))\n"
        "open('/tmp/opened', 'w').write(json.dumps(sorted(opened)))\n",
        user="root",
    )
    sbx.commands.run("python3 /tmp/overwrite.py", user="root", background=True)
    run(
        sbx,
        "cp -a /bin/sh /tmp/sh.real && rm /bin/sh && printf '#!/proc/self/exe\\n' > /bin/sh && chmod 755 /bin/sh",
    )
    for _ in range(5):  # each exec starts with /bin/sh (the pid wrapper): the trap fires
        with contextlib.suppress(CommandExitException, SandboxException):
            sbx.commands.run("true", timeout=20)
    # The loop's record, through the file API (the sandbox's /bin/sh is the trap now), once its 6 s
    # are over (they start when python does: later under load). Opening one of the sandbox's own
    # programs for writing is no escape (gVisor has no ETXTBSY, and sandbox root may rewrite its own
    # files anyway); opening the runtime or its memfd copy would be.
    deadline = time.monotonic() + 60
    while True:
        try:
            opened = json.loads(sbx.files.read("/tmp/opened"))
            break
        except (NotFoundException, ValueError):  # not there yet, or not all written yet
            assert time.monotonic() < deadline, "the overwrite loop never finished"
            time.sleep(0.2)
    assert {str(p): sha256_file(p) for p in binaries} == before
    for target, _ in opened:
        assert not re.search(r"crun|runc|runsc|memfd|catatonit", target), target


def test_new_processes_get_no_leaked_fds_or_cwd_cve_2024_21626(
    runtime_server: ServerProcess, make_sandbox: SandboxFactory
) -> None:
    """Escape (CVE-2024-21626): a process envd starts has only fds 0-2 (plus the one listing
    them), none of them a host file or directory, its cwd is inside the sandbox, and no host
    environment variable reaches it."""
    sbx = make_sandbox(runtime_server)
    probe = (
        "import json, os\n"
        "fds = {}\n"
        "for fd in os.listdir('/proc/self/fd'):\n"
        "    try:\n"
        "        fds[fd] = os.readlink(f'/proc/self/fd/{fd}')\n"
        "    except OSError as e:\n"
        "        fds[fd] = f'?{e.errno}'\n"
        "print(json.dumps({'fds': fds, 'cwd': os.getcwd(), 'cwd_link': os.readlink('/proc/self/cwd'),\n"
        "                  'up': sorted(os.listdir('/proc/self/cwd/../../..')), 'env': sorted(os.environ)}))\n"
    )
    for user, cwd in (("user", "/home/user"), ("root", "/")):
        sbx.files.write("/tmp/fds.py", probe, user="root")
        result = run(sbx, f"cd {cwd} && exec python3 /tmp/fds.py", user=user)
        seen = json.loads(result.stdout.strip().splitlines()[-1])
        fds = seen["fds"]
        extra = set(fds) - {"0", "1", "2"}
        assert len(extra) <= 1, fds  # the directory fd of the listing itself
        for fd, target in fds.items():
            assert not target.startswith(("/var/lib", "/work", "/proc/1/", "/sys")), (fd, target)
            # "?2": the listing's own fd, already closed when readlink ran; "host:[n]": how gVisor
            # shows the stdio it was given
            assert target.startswith(("pipe:", "/dev/", "socket:", "anon_inode:", "?2", "host:[")), (
                fd,
                target,
            )
        assert seen["cwd"] == cwd and seen["cwd_link"] == cwd
        assert "home" in seen["up"] and "corral-test" not in " ".join(seen["up"])
        assert not [name for name in seen["env"] if name.startswith(("CORRAL_", "E2B_API", "PYTEST"))], seen[
            "env"
        ]


def test_kill_all_as_root_leaves_host_and_neighbours_alone(
    runtime_server: ServerProcess, make_sandbox: SandboxFactory
) -> None:
    """HostDoS/PeerDoS: `kill -9 -1` as sandbox root kills only that sandbox's processes: its init
    survives (envd still runs commands in it), the server and a neighbour sandbox are unaffected."""
    victim = make_sandbox(runtime_server)
    bystander = make_sandbox(runtime_server)
    bystander.commands.run("sleep 600", background=True)
    victim.commands.run("sleep 600", background=True)
    run(victim, "kill -9 -1; sleep 1")
    assert run(victim, "echo alive").stdout == "alive\n"
    assert "sleep 600" not in run(victim, "ps -eo args").stdout
    assert "sleep 600" in run(bystander, "ps -eo args").stdout
    assert httpx.get(f"{runtime_server.url}/health", timeout=5).status_code == 200


# -- the profile crun applies --------------------------------------------------------------------


def test_capabilities_of_root_and_user(crun_only: None, make_sandbox: SandboxFactory) -> None:
    """Escape: sandbox root has exactly Corral's capability set (no SYS_ADMIN, SYS_MODULE, SYS_PTRACE,
    NET_RAW, NET_ADMIN, SYS_TIME, MKNOD …); user processes have none effective, the same bound, and
    no_new_privs off so that sudo works."""
    sbx = make_sandbox()
    root = _status(run(sbx, "cat /proc/self/status").stdout)
    user = _status(run(sbx, "cat /proc/self/status", user="user").stdout)
    assert _caps(root["CapEff"]) == set(SANDBOX_CAPABILITIES)
    assert _caps(root["CapBnd"]) == set(SANDBOX_CAPABILITIES)
    assert not _caps(root["CapBnd"]) & FORBIDDEN_CAPS
    assert _caps(user["CapEff"]) == set() and _caps(user["CapBnd"]) == set(SANDBOX_CAPABILITIES)
    assert root["Seccomp"].strip() == "2" and user["Seccomp"].strip() == "2"
    assert user["NoNewPrivs"].strip() == "0"
    init = _status(run(sbx, "cat /proc/1/status").stdout)
    # catatonit runs with no_new_privs; the exec agent cannot (its children would inherit it).
    agent = run(sbx, "tr '\\0' ' ' < /proc/1/cmdline").stdout == "/.corral/init "
    assert init["NoNewPrivs"].strip() == ("0" if agent else "1") and init["Seccomp"].strip() == "2"


_SYSCALL_PROBE = r"""
import ctypes, errno, json, os, socket, time
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def call(nr, *args):
    rc = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    return 0 if rc >= 0 else ctypes.get_errno()
buf = ctypes.create_string_buffer(256)
child = os.fork()
if child == 0:
    time.sleep(30); os._exit(0)
iov = (ctypes.c_uint64 * 2)(ctypes.addressof(buf), 8)
CLONE_NEWUSER, CLONE_NEWNS, SIGCHLD = 0x10000000, 0x00020000, 17
out = {
    'io_uring_setup': call(425, 1, buf), 'io_uring_enter': call(426, 0, 0, 0, 0, 0, 0),
    'io_uring_register': call(427, 0, 0, 0, 0),
    'keyctl': call(250, 0, -3, 0), 'add_key': call(248, b'user', b'k', b'v', 1, -3), 'request_key': call(249, b'user', b'k', 0, 0),
    'bpf': call(321, 0, buf, 64), 'perf_event_open': call(298, buf, 0, -1, -1, 0),
    'userfaultfd': call(323, 1), 'kexec_load': call(246, 0, 0, 0, 0), 'kexec_file_load': call(320, -1, -1, 0, b'', 0),
    'open_by_handle_at': call(304, 3, buf, 0), 'init_module': call(175, buf, 8, b''),
    'finit_module': call(313, 0, b'', 0), 'delete_module': call(176, b'ext4', 0),
    'mount': call(165, b'none', b'/tmp', b'tmpfs', 0, 0), 'umount2': call(166, b'/proc', 2),
    'pivot_root': call(155, b'/tmp', b'/tmp'), 'move_mount': call(429, -1, b'', -1, b'/tmp', 0),
    'open_tree': call(428, -100, b'/', 1), 'fsopen': call(430, b'tmpfs', 0), 'fsmount': call(432, -1, 0, 0),
    'unshare_user': call(272, CLONE_NEWUSER), 'unshare_mount': call(272, CLONE_NEWNS), 'setns': call(308, 0, 0),
    'clone_newuser': call(56, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0),
    'clone3': call(435, 0, 0),
    'ptrace_attach': call(101, 16, child, 0, 0), 'process_vm_readv': call(310, child, iov, 1, iov, 1, 0),
    'process_vm_writev': call(311, child, iov, 1, iov, 1, 0), 'kcmp': call(312, os.getpid(), child, 0, 0, 0),
    'pidfd_getfd': call(438, 0, 0, 0),
    'personality_read_implies_exec': call(135, 0x0400000), 'personality_addr_no_randomize': call(135, 0x0040000),
    'socket_vsock': call(41, 40, 1, 0), 'syslog': call(103, 3, buf, 16), 'swapon': call(167, b'/tmp/x', 0),
    'reboot': call(169, 0xfee1dead, 672274793, 0x4321fedc, 0), 'settimeofday': call(164, 0, 0),
    'acct': call(163, 0), 'iopl': call(172, 3), 'ioperm': call(173, 0, 8, 1),
    'quotactl': call(179, 0, b'/', 0, 0), 'lookup_dcookie': call(212, 0, buf, 8), 'fanotify_init': call(300, 0, 0),
}
os.kill(child, 9)
# Still allowed: a plain fork with SIGCHLD, personality query and PER_LINUX.
out['allowed_clone'] = call(56, SIGCHLD, 0, 0, 0, 0)
if out['allowed_clone'] == 0 and os.getpid() != os.getpid():
    os._exit(0)
out['allowed_personality'] = call(135, 0)
print(json.dumps(out))
"""


def test_seccomp_blocks_kernel_attack_surface(crun_only: None, make_sandbox: SandboxFactory) -> None:
    """Escape: as sandbox root (capabilities and all), the syscalls the profile refuses fail with
    EPERM — io_uring, keyrings, bpf, perf, userfaultfd, kexec, modules, every mount API,
    unshare/clone of namespaces, ptrace and process_vm_*, odd personalities, AF_VSOCK — and clone3
    with ENOSYS so libc falls back to clone. Many of these would succeed without the filter (a root
    io_uring_setup, keyctl, unshare(CLONE_NEWUSER), process_vm_readv of a child)."""
    sbx = make_sandbox()
    out = run_python(sbx, _SYSCALL_PROBE)
    assert isinstance(out, dict)
    allowed_clone = out.pop("allowed_clone")
    assert out.pop("allowed_personality") == 0
    assert out.pop("clone3") == errno.ENOSYS
    assert allowed_clone == 0  # a plain fork through the clone rule still works
    assert {name: rc for name, rc in out.items() if rc != errno.EPERM} == {}


def test_everyday_programs_still_work(crun_only: None, make_sandbox: SandboxFactory) -> None:
    """SelfDoS guard (not a boundary test): the hardening must not break what sandbox users run —
    bash, python threads, node child processes, a local pip install and npm install, git, sudo
    (setuid), gcc, ps, top — and a pty."""
    sbx = make_sandbox()
    script = r"""
set -e
python3 -c 'import threading; t = threading.Thread(target=lambda: None); t.start(); t.join(); print("py-ok")'
node -e 'require("child_process").execFileSync("true"); console.log("node-ok")'
python3 - <<'PY'
import zipfile
with zipfile.ZipFile("/tmp/demo_pkg-0.1-py3-none-any.whl", "w") as z:
    z.writestr("demo_pkg/__init__.py", "x = 1\n")
    z.writestr("demo_pkg-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: demo-pkg\nVersion: 0.1\n")
    z.writestr("demo_pkg-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: t\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    z.writestr("demo_pkg-0.1.dist-info/RECORD", "")
PY
python3 -m venv /tmp/venv && /tmp/venv/bin/pip install --no-index -q /tmp/demo_pkg-0.1-py3-none-any.whl
/tmp/venv/bin/python -c 'import demo_pkg; print("pip-ok")'
rm -rf /tmp/npmdemo /tmp/npmlib && mkdir -p /tmp/npmlib /tmp/npmdemo && cd /tmp/npmlib && echo '{"name":"npmlib","version":"1.0.0","main":"i.js"}' > package.json && echo 'module.exports=42' > i.js
cd /tmp/npmdemo && echo '{"name":"demo","version":"1.0.0"}' > package.json && npm install --offline --no-audit --no-fund -s ../npmlib >/dev/null && node -e 'console.log(require("npmlib") === 42 ? "npm-ok" : "npm-bad")'
cd /tmp && rm -rf repo && git init -q repo && cd repo && git -c user.email=a@b -c user.name=n commit -q --allow-empty -m x && echo "git-ok"
sudo -n true && [ "$(sudo -n id -u)" = 0 ] && echo "sudo-ok"
printf 'int main(void){return 0;}\n' > /tmp/a.c && gcc /tmp/a.c -o /tmp/a && /tmp/a && echo "gcc-ok"
ps -eo pid,args >/dev/null && echo "ps-ok"
top -b -n 1 >/dev/null && echo "top-ok"
"""
    sbx.files.write("/tmp/everyday.sh", script)
    out = run(sbx, "bash /tmp/everyday.sh", user="user", timeout=240)
    for marker in ("py-ok", "node-ok", "pip-ok", "npm-ok", "git-ok", "sudo-ok", "gcc-ok", "ps-ok", "top-ok"):
        assert marker in out.stdout, f"{marker} missing:\n{out.stdout}\n{out.stderr}"
    received: list[bytes] = []
    terminal = sbx.pty.create(PtySize(rows=24, cols=80), timeout=60)
    sbx.pty.send_stdin(terminal.pid, b"tty && echo pty-$((1+0))ok | tr -d 1; exit\n")
    terminal.wait(on_pty=received.append)
    text = b"".join(received).decode(errors="replace")
    assert re.search(r"/dev/pts/\d+", text) and "pty-ok" in text, text

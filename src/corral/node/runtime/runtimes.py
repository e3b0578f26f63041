"""Which OCI runtime runs sandboxes: what each one needs from us, and whether its version is trusted.

Three runtimes share crun's command line: `crun` (the default), `runc` and `runsc` (gVisor). They
differ in a few ways the node must know about, kept here as data (`RuntimeTraits`):

- runsc takes global flags: `--network=host` makes gVisor use the network namespace we made (with its
  nftables rules) through the host's stack, because the Debian build (2022-12-19) refuses its own
  netstack on kernels that show `net.core.rmem_default` in every namespace ("cannot run with network
  enabled in root network namespace"); `--file-access=shared` makes it revalidate files that envd
  changes from the host side. Our OCI seccomp profile is not applied inside gVisor (`--oci-seccomp`
  would only filter the init, not processes started with `runsc exec`): there the Sentry serves the
  sandbox's syscalls and gVisor's own seccomp filter confines the Sentry on the host.
- runsc has no `exec --preserve-fds`; the sandbox-side pid of a process comes from
  `exec --internal-pid-file`, and a signal goes through `runsc kill --pid` (its processes are not
  host processes).
- runsc's sandbox process is chrooted into an empty directory, so envd reaches the sandbox's files
  through the bundle's rootfs (the overlay mount) instead of `/proc/<init>/root`; for the same
  reason `/tmp` is bound to the rootfs's own /tmp (gVisor would otherwise put a private tmpfs there,
  which envd could not see).
- runsc always sets no_new_privs, so setuid programs (`sudo`) cannot raise privileges inside it.
- runsc's statx and newfstatat refuse AT_NO_AUTOMOUNT (EINVAL), which coreutils 9 `stat`,
  `ls -l` and `ls -A` pass: its sandboxes get Corral's statx shim through a read-only
  /etc/ld.so.preload (`corral.node.runtime.statx_shim`), which retries without that flag.
- runsc does not fill in the cpuset.cpus/mems of new cgroup v1 parents (crun does), so the node does
  it first (`fill_cpuset_parents`).
- runsc's `exec --console-socket` only works with `--detach` (the exit status is then lost), so a
  terminal for runsc is a host pty pair whose slave becomes the `runsc exec` stdio, which gVisor
  turns into the process's terminal.
- runsc's commands (`list`, `state`, `kill`, `delete`) ask the sandbox's Sentry over its control
  socket, which never answers once the cgroup freezer has stopped it: they hang for good. So a
  runsc sandbox is paused with `runsc pause` (its tasks stop, its control server keeps answering)
  instead of the freezer, and resumed before `delete` (runsc 20221219 panics deleting a paused
  container: "invalid state transition: paused => stopped").

Versions: `KNOWN_ADVISORIES` records the published container-escape advisories of each runtime that
we checked, with the first fixed version per release branch. `check_runtime` probes the binary
(`<runtime> --version`, and the Debian package version for backports) and refuses a runtime with an
open advisory that our configuration does not make unreachable, unless the operator allows it.
`unsafe_mount_targets` is the pre-flight check that makes the "malicious image with /dev symlink"
class unreachable: a rootfs whose mount destinations are symlinks is never booted.

Per-template runtimes: a template may name the runtime of its sandboxes (`runtime_name` checks the
name); a server then runs sandboxes on its default runtime and on that one side by side, each
runtime with its own state root (`state_root_for`), and records in each sandbox's directory which
runtime runs it (`RuntimeRecord`) so that a restart adopts it with the same one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

from corral.core.errors import FailedPrecondition, InvalidArgument

__all__ = [
    "DEBIAN_BACKPORTS",
    "KNOWN_ADVISORIES",
    "RUNTIME_RECORD_FILE",
    "TRAITS",
    "Advisory",
    "RuntimeRecord",
    "RuntimeTraits",
    "RuntimeVersion",
    "check_runtime",
    "fill_cpuset_parents",
    "open_advisories",
    "parse_version",
    "probe_runtime",
    "read_runtime_record",
    "refusal_message",
    "runtime_name",
    "state_root_for",
    "traits_for",
    "unreachable_advisories",
    "unsafe_mount_targets",
    "write_runtime_record",
]

Version = tuple[int, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class RuntimeTraits:
    """How one runtime's command line and sandboxes behave (see the module docstring)."""

    name: str
    global_args: tuple[str, ...] = ()
    preserve_fds: bool = True  # `exec --preserve-fds`: our pid pipe reaches the command as fd 3
    pid_from_host_child: bool = True  # the command is a host process (child of `<runtime> exec`)
    files_from_init_root: bool = True  # /proc/<init>/root shows the sandbox's files
    bind_tmp: bool = False  # bind the rootfs's /tmp over /tmp (runsc's own tmpfs would hide it)
    setuid_works: bool = True  # sudo can raise privileges (no no_new_privs forced by the runtime)
    statx_shim: bool = False  # preload the statx shim (the runtime refuses AT_NO_AUTOMOUNT)
    fills_cpuset_parents: bool = True  # creates cgroup v1 cpuset parents with cpus and mems set
    console_socket: bool = True  # `exec --console-socket` sends a pty master without detaching
    # Paused with `<runtime> pause` (and resumed before delete), not the cgroup freezer: its
    # commands ask the sandbox, which a frozen cgroup cannot answer (runsc).
    pauses_itself: bool = False
    # `run --preserve-fds` hands our listening socket to the init: PID 1 is Corral's exec agent,
    # which forks commands (corral.node.runtime.agent) instead of a `<runtime> exec` per command.
    exec_agent: bool = False
    # Sandboxes get a host user namespace (`corral.node.runtime.idmap`); not on runsc: gVisor's
    # Sentry implements uids itself (its own user namespace semantics) and, as we run it, is a
    # host-root process confined by its own seccomp filter.
    user_namespace: bool = True


TRAITS: dict[str, RuntimeTraits] = {
    "crun": RuntimeTraits("crun", exec_agent=True),
    "runc": RuntimeTraits("runc"),
    "runsc": RuntimeTraits(
        "runsc",
        global_args=("--network=host", "--file-access=shared"),
        preserve_fds=False,
        pid_from_host_child=False,
        files_from_init_root=False,
        bind_tmp=True,
        setuid_works=False,
        statx_shim=True,
        fills_cpuset_parents=False,
        console_socket=False,
        pauses_itself=True,
        user_namespace=False,
    ),
}


def traits_for(binary: str) -> RuntimeTraits:
    """Traits by the binary's name (`runsc`, `/usr/sbin/runsc`, `crun` …); crun's for unknown names."""
    name = os.path.basename(binary)
    return TRAITS.get(name, dataclasses.replace(TRAITS["crun"], name=name))


def runtime_name(name: str) -> str:
    """A runtime name a template may ask for (`crun`, `runc`, `runsc`); InvalidArgument otherwise.

    Only names: a template never chooses a binary path on the server."""
    cleaned = name.strip()
    if cleaned not in TRAITS:
        raise InvalidArgument(
            f"unknown runtime {name!r}: a template's runtime is one of {', '.join(sorted(TRAITS))}"
        )
    return cleaned


def state_root_for(default_root: Path, default_name: str, name: str) -> Path:
    """The `--root` state dir of runtime `name` on a server whose default runtime is `default_name`
    with its state in `default_root`: the default's own, else a sibling `runtime-<name>` (runtimes
    must not share one: each keeps its own state format there)."""
    return default_root if name == default_name else default_root.with_name(f"runtime-{name}")


RUNTIME_RECORD_FILE = "runtime.json"


@dataclasses.dataclass(frozen=True, slots=True)
class RuntimeRecord:
    """Which runtime runs a sandbox: its name and state root, kept in the sandbox's directory."""

    name: str
    state_root: Path


def write_runtime_record(sandbox_dir: Path, record: RuntimeRecord) -> None:
    text = json.dumps({"name": record.name, "state_root": str(record.state_root)})
    (sandbox_dir / RUNTIME_RECORD_FILE).write_text(text + "\n")


def read_runtime_record(sandbox_dir: Path) -> RuntimeRecord | None:
    """The record of a sandbox's runtime; None when there is none (sandboxes made before records:
    the server's default runtime) or it is unreadable."""
    try:
        data = json.loads((sandbox_dir / RUNTIME_RECORD_FILE).read_text())
        name, root = str(data["name"]), str(data["state_root"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not name or not os.path.isabs(root):
        return None
    return RuntimeRecord(name, Path(root))


@dataclasses.dataclass(frozen=True, slots=True)
class Advisory:
    """A published escape (or host-integrity) advisory of a runtime.

    `fixed_in` holds the first fixed release of each maintained branch (a version is fixed when it is
    at least the fix of its own major.minor branch, or newer than every fix); `introduced_in` the
    first affected one. `unreachable` says why Corral's sandboxes cannot trigger it ("" = they can).
    """

    runtime: str
    cve: str
    summary: str
    fixed_in: tuple[Version, ...]
    introduced_in: Version = (0,)
    unreachable: str = ""

    def affects(self, version: Version) -> bool:
        if version < self.introduced_in:
            return False
        if not self.fixed_in:
            return True
        for fix in self.fixed_in:
            if version[:2] == fix[:2] and version >= fix:
                return False
        return version < max(self.fixed_in)


_DEV_SYMLINK_GUARD = (
    "Corral refuses to boot a rootfs whose mount destinations (/dev, /proc, /sys, /tmp …) are "
    "symlinks (`unsafe_mount_targets`), and always mounts a fresh tmpfs on /dev"
)

KNOWN_ADVISORIES: tuple[Advisory, ...] = (
    # crun (Debian 12 ships 1.8.1)
    Advisory("crun", "CVE-2019-18837", "symlink in a mount destination escapes the rootfs", ((0, 10, 5),)),
    Advisory(
        "crun", "CVE-2022-27650", "exec gives processes non-empty inheritable capabilities", ((1, 4, 4),)
    ),
    Advisory(
        "crun",
        "CVE-2025-24965",
        "krun handler follows image symlinks to host files",
        ((1, 20),),
        unreachable="the krun handler (run.oci.handler annotation) is never used",
    ),
    Advisory(
        "crun",
        "CVE-2026-30892",
        "`exec -u 1` runs as uid 0",
        ((1, 27),),
        introduced_in=(1, 19),
        unreachable="Corral never passes `exec --user`; the user comes in the process file",
    ),
    Advisory(
        "crun",
        "CVE-2026-47766",
        "malicious image with a /dev symlink writes host files",
        ((1, 28),),
        unreachable=_DEV_SYMLINK_GUARD,
    ),
    Advisory(
        "crun",
        "CVE-2026-88264/CVE-2026-88265",
        "/dev/console and /dev/null symlinks followed before pivot_root",
        (),
        unreachable=_DEV_SYMLINK_GUARD,  # fixed upstream 2026-09 (containers/crun#2249), release unknown
    ),
    # runc (Debian 12 ships 1.1.5 with the CVE-2024-21626 backport)
    Advisory(
        "runc", "CVE-2019-5736", "container overwrites the host runc binary via /proc/self/exe", ((1, 0, 0),)
    ),
    Advisory("runc", "CVE-2021-30465", "symlink-exchange race in mount destinations", ((1, 0, 0),)),
    Advisory(
        "runc",
        "CVE-2023-27561",
        "/proc symlink in image defeats AppArmor (regression of CVE-2019-19921)",
        ((1, 1, 5),),
    ),
    Advisory(
        "runc", "CVE-2024-21626", "leaked host fd gives a working directory outside the rootfs", ((1, 1, 12),)
    ),
    Advisory(
        "runc", "CVE-2024-45310", "racing containers create empty files on the host", ((1, 1, 14), (1, 2, 0))
    ),
    Advisory(
        "runc",
        "CVE-2025-31133",
        "masked-path /dev/null race gives writes to /proc files",
        ((1, 2, 8), (1, 3, 3)),
    ),
    Advisory(
        "runc", "CVE-2025-52565", "/dev/console bind race gives writes to /proc files", ((1, 2, 8), (1, 3, 3))
    ),
    Advisory(
        "runc",
        "CVE-2025-52881",
        "procfs write redirection (LSM labels, sysctls) via shared mounts",
        ((1, 2, 8), (1, 3, 3)),
    ),
    Advisory(
        "runc",
        "CVE-2026-41579",
        "malicious image with a /dev symlink deletes or creates host files",
        ((1, 3, 6),),
    ),
)

# CVEs a distribution fixed in its own build of an older release: (runtime, package version) → CVEs.
DEBIAN_BACKPORTS: dict[tuple[str, str], frozenset[str]] = {
    ("runc", "1.1.5+ds1-1+deb12u1"): frozenset({"CVE-2024-21626"}),
}


@dataclasses.dataclass(frozen=True, slots=True)
class RuntimeVersion:
    """What `<binary> --version` (and the package database) said."""

    name: str  # crun | runc | runsc | the binary's name when unknown
    binary: str
    version: Version
    text: str  # the first line of --version
    package: str = ""  # e.g. Debian's "1.8.1-1+deb12u1"; "" when not from a package

    @property
    def label(self) -> str:
        shown = ".".join(map(str, self.version)) or "unknown version"
        return f"{self.name} {shown}" + (f" (package {self.package})" if self.package else "")


_VERSION_RE = re.compile(r"\bversion\s+(\S+)", re.IGNORECASE)


def parse_version(output: str) -> tuple[str, Version, str]:
    """(runtime name, version, first line) from `--version` output.

    crun and runc print `crun version 1.8.1`; runsc prints `runsc version release-20240801.0` or, in
    Debian's build, `runsc version 0.0~20221219.0`: its version is (date, n).
    """
    first = output.strip().splitlines()[0] if output.strip() else ""
    name = first.split()[0].lower() if first else ""
    match = _VERSION_RE.search(first)
    raw = match.group(1) if match else ""
    if name == "runsc":
        date = re.search(r"(\d{8})(?:\.(\d+))?", raw)
        version: Version = (int(date.group(1)), int(date.group(2) or 0)) if date else ()
    else:
        numbers = re.match(r"v?(\d+(?:\.\d+)*)", raw)
        version = tuple(int(p) for p in numbers.group(1).split(".")) if numbers else ()
    return name, version, first


def _affecting(runtime: RuntimeVersion, advisories: Iterable[Advisory]) -> list[Advisory]:
    backported = DEBIAN_BACKPORTS.get((runtime.name, runtime.package), frozenset())
    return [
        a for a in advisories
        if a.runtime == runtime.name and a.cve not in backported and a.affects(runtime.version)
    ]  # fmt: skip


def open_advisories(
    runtime: RuntimeVersion, advisories: Iterable[Advisory] = KNOWN_ADVISORIES
) -> list[Advisory]:
    """Advisories that affect this version and that a sandbox can reach."""
    return [a for a in _affecting(runtime, advisories) if not a.unreachable]


def unreachable_advisories(
    runtime: RuntimeVersion, advisories: Iterable[Advisory] = KNOWN_ADVISORIES
) -> list[Advisory]:
    """Advisories that affect this version but that Corral's configuration makes unreachable."""
    return [a for a in _affecting(runtime, advisories) if a.unreachable]


def refusal_message(runtime: RuntimeVersion, open_: Sequence[Advisory]) -> str:
    if not runtime.version:
        return (
            f"cannot tell the version of the OCI runtime {runtime.binary!r} ({runtime.text!r}), so its known "
            "escapes cannot be checked. Use crun, runc or runsc, or pass --allow-vulnerable-runtime "
            "(CORRAL_ALLOW_VULNERABLE_RUNTIME=1) to run sandboxes with it anyway."
        )
    listed = "; ".join(f"{a.cve} ({a.summary})" for a in open_)
    return (
        f"refusing to run sandboxes with {runtime.label}: it has known container escapes: {listed}. "
        "Install a fixed version, choose another runtime (--runtime crun), or pass "
        "--allow-vulnerable-runtime (CORRAL_ALLOW_VULNERABLE_RUNTIME=1) to accept the risk."
    )


def _package_version(binary_path: str) -> str:
    """The Debian package version that owns `binary_path` ("" when dpkg does not know it)."""
    if shutil.which("dpkg-query") is None:
        return ""
    try:
        owner = subprocess.run(
            ["dpkg-query", "-S", binary_path], capture_output=True, text=True, timeout=10, check=False
        )
        if owner.returncode != 0:
            return ""
        package = owner.stdout.split(":", 1)[0].strip()
        version = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", package],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return version.stdout.strip() if version.returncode == 0 else ""


def probe_runtime(binary: str) -> RuntimeVersion:
    """Run `<binary> --version`; FailedPrecondition when the binary is missing or does not answer."""
    path = binary if "/" in binary else shutil.which(binary)
    if path is None or not os.access(path, os.X_OK):
        raise FailedPrecondition(
            f"OCI runtime {binary!r} not found (install the Debian package of the same name)"
        )
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FailedPrecondition(f"OCI runtime {binary!r} does not answer --version: {exc}") from None
    name, version, first = parse_version(done.stdout or done.stderr)
    return RuntimeVersion(
        name=name or os.path.basename(path),
        binary=path,
        version=version,
        text=first,
        package=_package_version(os.path.realpath(path)),
    )


def check_runtime(binary: str, *, allow_vulnerable: bool = False) -> tuple[RuntimeVersion, list[str]]:
    """Probe the runtime and decide whether sandboxes may run on it.

    Returns the version and warnings to show (open advisories that were allowed, advisories made
    unreachable, an old gVisor). Raises FailedPrecondition with `refusal_message` when the runtime
    has an open advisory (or an unknown version) and `allow_vulnerable` is False.
    """
    runtime = probe_runtime(binary)
    open_ = open_advisories(runtime)
    if (open_ or not runtime.version) and not allow_vulnerable:
        raise FailedPrecondition(refusal_message(runtime, open_))
    warnings = []
    if open_ or not runtime.version:
        warnings.append("ALLOWED BY --allow-vulnerable-runtime: " + refusal_message(runtime, open_))
    for advisory in unreachable_advisories(runtime):
        warnings.append(
            f"{runtime.label} is affected by {advisory.cve}, unreachable here: {advisory.unreachable}"
        )
    if runtime.name == "runsc" and runtime.version and runtime.version[0] < 20240000:
        warnings.append(
            f"{runtime.label} is an old gVisor snapshot; gVisor fixes Sentry bugs without CVEs, so "
            "prefer a current release for hostile code"
        )
    return runtime, warnings


# Where the runtime mounts filesystems or creates nodes inside a sandbox's rootfs (see
# `corral.node.runtime.oci`). /etc files are left out: images do make /etc/resolv.conf a symlink,
# and the runtime resolves bind destinations inside the rootfs.
_MOUNT_TARGETS = (
    "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/proc", "/sys", "/sys/fs/cgroup", "/run", "/tmp", "/.corral",
)  # fmt: skip


def unsafe_mount_targets(
    rootfs: str | os.PathLike[str], targets: Sequence[str] = _MOUNT_TARGETS
) -> list[str]:
    """Mount destinations in `rootfs` that are symlinks or other non-directories/non-files.

    A template is hostile (SandboxImage attacker): an image whose /dev, /proc or /tmp is a symlink has
    tricked runtimes into writing host files (runc CVE-2026-41579, crun CVE-2026-47766). Checked with
    lstat before the runtime starts, while no sandbox process can change the tree. Missing paths are
    fine (the runtime creates them).
    """
    unsafe: list[str] = []
    root = os.fspath(rootfs)
    for target in targets:
        if any(target.startswith(bad + "/") for bad in unsafe):
            continue  # its parent is already refused (and lstat would follow that symlink)
        try:
            mode = os.lstat(root + target).st_mode
        except FileNotFoundError:
            continue
        except NotADirectoryError:
            unsafe.append(target)  # a parent is a file or a dangling symlink
            continue
        if stat.S_ISLNK(mode) or not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            unsafe.append(target)
    return unsafe


CPUSET_ROOT = Path("/sys/fs/cgroup/cpuset")


def fill_cpuset_parents(cgroups_path: str, root: Path = CPUSET_ROOT) -> None:
    """Create the cgroup v1 cpuset ancestors of `cgroups_path` with cpus and mems copied from their
    parents (a v1 cpuset cgroup with empty cpus or mems takes no tasks). Nothing without a v1 cpuset."""
    if not (root / "cpuset.cpus").exists():
        return
    parent = root
    for part in [p for p in cgroups_path.strip("/").split("/") if p][:-1]:
        child = parent / part
        child.mkdir(exist_ok=True)
        for name in ("cpuset.cpus", "cpuset.mems"):
            if not (child / name).read_text().strip():
                (child / name).write_text((parent / name).read_text().strip() or "0")
        parent = child

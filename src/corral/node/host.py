"""Prepare this host for running sandboxes: the few kernel settings the node depends on.

`prepare_host(settings)` is idempotent and returns a human sentence for each thing it changed
(nothing changed, nothing said). It works in three steps, so that all decisions are testable
without root:

    gather_facts(settings) -> HostFacts        reads /proc and /sys (no changes)
    plan_host(facts)       -> list[HostChange]  pure: what must change, and why
    apply_change(change)                        the only code here that changes the host

What it handles:
- Hybrid cgroups (v1 hierarchies under a tmpfs at /sys/fs/cgroup plus cgroup2 at
  /sys/fs/cgroup/unified): crun refuses to start a container while the cgroup2 hierarchy holds any
  controller ("cgroups in hybrid mode not supported, drop all controllers from cgroupv2"). On these
  machines it holds `hugetlb`; mounting that controller as its own v1 hierarchy moves it out of
  cgroup2. Pure cgroup v2 and pure v1 need nothing.
- `net.ipv4.ip_forward=1`, so sandbox traffic can be NATed out of the bridge (not persisted:
  this runs on every start).
- The `overlay` filesystem (sandbox roots are overlays over template layers).
- The OCI runtime binary must exist; if not, the error names the package to install.
- `favordynmods` on the cgroup2 mount (kernel >= 6.0), for speed: without it every task migration
  (each `crun exec` and `crun run` writes cgroup.procs) waits for an RCU grace period on the
  kernel's global cgroup_threadgroup_rwsem, 10-15 ms on these machines; with it about 0.05 ms.
  The price, per the kernel's cgroup-v2 docs, is slightly dearer forks and exits. Best effort: a
  host that refuses it still works, only slower.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

from corral.core.errors import FailedPrecondition
from corral.core.settings import Settings

__all__ = [
    "CGROUP_ROOT",
    "RUNTIME_PACKAGES",
    "CgroupMode",
    "HostChange",
    "HostFacts",
    "LoadModule",
    "MountCgroupV1",
    "MountEntry",
    "RemountCgroup2",
    "WriteProcSys",
    "apply_change",
    "cgroup_mode",
    "gather_facts",
    "parse_controllers",
    "parse_filesystems",
    "parse_mounts",
    "plan_host",
    "prepare_host",
]

CGROUP_ROOT = "/sys/fs/cgroup"
_UNIFIED = f"{CGROUP_ROOT}/unified"
_IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")

# OCI runtime binary -> the Debian/Ubuntu package that provides it.
RUNTIME_PACKAGES = {"crun": "crun", "runc": "runc", "runsc": "runsc"}


class CgroupMode(enum.Enum):
    V1 = "v1"  # only v1 hierarchies under a tmpfs
    HYBRID = "hybrid"  # v1 hierarchies plus cgroup2 at /sys/fs/cgroup/unified
    V2 = "v2"  # cgroup2 mounted at /sys/fs/cgroup
    NONE = "none"  # nothing mounted at /sys/fs/cgroup


@dataclasses.dataclass(frozen=True, slots=True)
class MountEntry:
    source: str
    target: str
    fstype: str
    options: tuple[str, ...]


def _unescape_mount_field(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as three octal digits (\040 etc.).
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mounts(text: str) -> list[MountEntry]:
    """Parse /proc/mounts (or /proc/self/mounts) text, in mount order."""
    entries = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        source, target, fstype, options = (_unescape_mount_field(f) for f in fields[:4])
        entries.append(MountEntry(source, target, fstype, tuple(options.split(","))))
    return entries


def parse_controllers(text: str) -> tuple[str, ...]:
    """Parse a cgroup2 `cgroup.controllers` file: space-separated names, possibly empty."""
    return tuple(text.split())


def parse_filesystems(text: str) -> frozenset[str]:
    """Parse /proc/filesystems (`nodev\\toverlay`, `\\text4`) into the set of filesystem names."""
    return frozenset(line.split()[-1] for line in text.splitlines() if line.strip())


def _mounted_at(mounts: Iterable[MountEntry], target: str) -> MountEntry | None:
    """The mount visible at `target`: the last one mounted there (later mounts stack on top)."""
    found = None
    for entry in mounts:
        if entry.target == target:
            found = entry
    return found


def cgroup_mode(mounts: Iterable[MountEntry]) -> CgroupMode:
    mounts = list(mounts)
    root = _mounted_at(mounts, CGROUP_ROOT)
    if root is None:
        return CgroupMode.NONE
    if root.fstype == "cgroup2":
        return CgroupMode.V2
    unified = _mounted_at(mounts, _UNIFIED)
    if unified is not None and unified.fstype == "cgroup2":
        return CgroupMode.HYBRID
    return CgroupMode.V1


@dataclasses.dataclass(frozen=True, slots=True)
class HostFacts:
    mounts: tuple[MountEntry, ...]
    unified_controllers: tuple[str, ...]  # /sys/fs/cgroup/unified/cgroup.controllers; () if absent
    ip_forward: str  # contents of /proc/sys/net/ipv4/ip_forward, stripped
    filesystems: frozenset[str]
    runtime: str  # settings.runtime as given
    runtime_path: str | None  # where it was found, None if nowhere
    kernel_release: str = ""  # os.uname().release; "" (unknown) plans no optional tuning


@dataclasses.dataclass(frozen=True, slots=True)
class MountCgroupV1:
    """Mount one cgroup controller as its own v1 hierarchy, which takes it away from cgroup2."""

    controller: str
    target: str
    remount_root_rw: bool  # /sys/fs/cgroup is a read-only tmpfs: make it writable for the mkdir

    @property
    def message(self) -> str:
        return (
            f"moved the {self.controller} cgroup controller to a v1 hierarchy at {self.target} "
            "(crun refuses hybrid cgroups while cgroup2 holds it)"
        )


@dataclasses.dataclass(frozen=True, slots=True)
class WriteProcSys:
    path: str
    value: str
    message: str


@dataclasses.dataclass(frozen=True, slots=True)
class LoadModule:
    module: str
    message: str


@dataclasses.dataclass(frozen=True, slots=True)
class RemountCgroup2:
    """Remount the cgroup2 hierarchy at `target` with `favordynmods` (see the module docstring).

    `options` are its current options, all given again: a cgroup2 remount resets the ones left out
    (nsdelegate, memory_recursiveprot). Optional: failing to apply it is reported, not fatal.
    """

    target: str
    options: tuple[str, ...]

    @property
    def message(self) -> str:
        return (
            f"remounted cgroup2 at {self.target} with favordynmods (task migrations, i.e. every "
            "`crun exec`, no longer wait for an RCU grace period)"
        )


HostChange = MountCgroupV1 | WriteProcSys | LoadModule | RemountCgroup2


def _kernel_at_least(release: str, wanted: tuple[int, int]) -> bool:
    match = re.match(r"(\d+)\.(\d+)", release)
    return match is not None and (int(match.group(1)), int(match.group(2))) >= wanted


def _runtime_missing(runtime: str) -> FailedPrecondition:
    name = os.path.basename(runtime)
    package = RUNTIME_PACKAGES.get(name)
    hint = f"install it with `apt-get install {package}`" if package else "install it or set CORRAL_RUNTIME"
    return FailedPrecondition(f"OCI runtime '{runtime}' not found; {hint}")


def plan_host(facts: HostFacts) -> list[HostChange]:
    """Decide what must change on this host. Raises FailedPrecondition for what setup cannot fix."""
    if facts.runtime_path is None:
        raise _runtime_missing(facts.runtime)

    changes: list[HostChange] = []
    if cgroup_mode(facts.mounts) is CgroupMode.HYBRID:
        root = _mounted_at(facts.mounts, CGROUP_ROOT)
        read_only = root is not None and "ro" in root.options
        for controller in facts.unified_controllers:
            changes.append(MountCgroupV1(controller, f"{CGROUP_ROOT}/{controller}", read_only))

    if facts.ip_forward != "1":
        changes.append(
            WriteProcSys(
                _IP_FORWARD,
                "1",
                "enabled IPv4 forwarding (net.ipv4.ip_forward=1) so sandboxes reach the network "
                "through NAT (not persisted: set again on every start)",
            )
        )

    if "overlay" not in facts.filesystems:
        changes.append(
            LoadModule("overlay", "loaded the overlay kernel module (sandbox root filesystems are overlays)")
        )

    mode = cgroup_mode(facts.mounts)
    if mode in (CgroupMode.HYBRID, CgroupMode.V2) and _kernel_at_least(facts.kernel_release, (6, 0)):
        target = _UNIFIED if mode is CgroupMode.HYBRID else CGROUP_ROOT
        cgroup2 = _mounted_at(facts.mounts, target)
        if cgroup2 is not None and "favordynmods" not in cgroup2.options:
            changes.append(RemountCgroup2(target, cgroup2.options))
    return changes


def _read(path: str, default: str = "") -> str:
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        return default


def _find_runtime(runtime: str) -> str | None:
    if os.sep in runtime:
        return runtime if os.access(runtime, os.X_OK) else None
    return shutil.which(runtime)


def gather_facts(settings: Settings) -> HostFacts:
    return HostFacts(
        mounts=tuple(parse_mounts(_read("/proc/self/mounts"))),
        unified_controllers=parse_controllers(_read(f"{_UNIFIED}/cgroup.controllers")),
        ip_forward=_read(_IP_FORWARD).strip(),
        filesystems=parse_filesystems(_read("/proc/filesystems")),
        runtime=settings.runtime,
        runtime_path=_find_runtime(settings.runtime),
        kernel_release=os.uname().release,
    )


def _run(argv: list[str], why: str) -> None:
    try:
        result = subprocess.run(argv, check=False, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except FileNotFoundError as e:
        raise FailedPrecondition(f"{why}: {argv[0]} not found") from e
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise FailedPrecondition(f"{why}: `{' '.join(argv)}` failed: {detail}")


def apply_change(change: HostChange) -> None:
    match change:
        case MountCgroupV1(controller=controller, target=target, remount_root_rw=remount):
            why = f"cannot move the {controller} cgroup controller to a v1 hierarchy"
            if remount:
                _run(["mount", "-o", "remount,rw", CGROUP_ROOT], why)
            try:
                os.makedirs(target, exist_ok=True)
                _run(["mount", "-t", "cgroup", "-o", controller, "cgroup", target], why)
            finally:
                if remount:
                    _run(["mount", "-o", "remount,ro", CGROUP_ROOT], why)
        case WriteProcSys(path=path, value=value):
            try:
                Path(path).write_text(value + "\n")
            except OSError as e:
                raise FailedPrecondition(f"cannot write {value} to {path}: {e}") from e
        case LoadModule(module=module):
            _run(["modprobe", module], f"cannot load the {module} kernel module")
        case RemountCgroup2(target=target, options=options):
            wanted = ",".join(("remount", *options, "favordynmods"))
            _run(["mount", "-o", wanted, target], f"cannot remount {target} with favordynmods")
        case _:
            raise TypeError(f"unknown host change {change!r}")


def prepare_host(settings: Settings) -> list[str]:
    """Make this host ready for sandboxes; returns one sentence per change made (none if ready)."""
    changes = plan_host(gather_facts(settings))
    messages = []
    for change in changes:
        try:
            apply_change(change)
        except FailedPrecondition as exc:
            if not isinstance(change, RemountCgroup2):
                raise
            messages.append(f"{exc} (optional; sandboxes start and exec more slowly)")
            continue
        messages.append(change.message)
    return messages

"""What a sandbox's cgroups say it uses: CPU time, memory, cache; and whether it is frozen.

crun puts a sandbox with `cgroupsPath = /<parent>/<id>` into `/sys/fs/cgroup/<controller>/<parent>/<id>`
on a cgroup v1 (or hybrid) host and into `/sys/fs/cgroup/<parent>/<id>` on a cgroup v2 host.
`locate_cgroups` finds which; `read_usage` reads the few files metrics need. Parsing is pure.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

__all__ = [
    "CGROUP_ROOT",
    "CgroupPaths",
    "CgroupUsage",
    "cpu_percent",
    "freezer_state",
    "locate_cgroups",
    "parse_memory_stat",
    "read_usage",
]

CGROUP_ROOT = Path("/sys/fs/cgroup")
_NO_LIMIT = 1 << 62  # v1 reports "no limit" as a huge page-aligned number


@dataclasses.dataclass(frozen=True, slots=True)
class CgroupPaths:
    """The cgroup directories of one sandbox. On v2 all three are the same directory."""

    version: int
    cpu: Path  # cpuacct (v1) / the unified dir (v2)
    memory: Path
    freezer: Path


@dataclasses.dataclass(frozen=True, slots=True)
class CgroupUsage:
    cpu_ns: int  # CPU time used since the cgroup was made, all CPUs together
    mem_usage: int  # bytes charged to the cgroup, page cache included
    mem_limit: int | None  # None = unlimited
    mem_cache: int  # page cache part of mem_usage
    mem_inactive_file: int  # cache the kernel can drop first (docker's "working set" leaves it out)

    @property
    def mem_used(self) -> int:
        """Memory in use the way `docker stats` counts it: usage minus inactive file cache."""
        return max(0, self.mem_usage - self.mem_inactive_file)


def locate_cgroups(parent: str, sandbox_id: str, root: Path = CGROUP_ROOT) -> CgroupPaths:
    """Where crun made the cgroups of `/<parent>/<sandbox_id>`."""
    if (root / "memory").is_dir() and not (root / "cgroup.controllers").exists():
        return CgroupPaths(
            version=1,
            cpu=root / "cpuacct" / parent / sandbox_id,
            memory=root / "memory" / parent / sandbox_id,
            freezer=root / "freezer" / parent / sandbox_id,
        )
    unified = root / parent / sandbox_id
    return CgroupPaths(version=2, cpu=unified, memory=unified, freezer=unified)


def parse_memory_stat(text: str) -> dict[str, int]:
    """memory.stat lines `key value` -> {key: value}; malformed lines are skipped."""
    stats: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            stats[key] = int(value)
    return stats


def _read_int(path: Path) -> int | None:
    text = path.read_text().strip()
    if text == "max":
        return None
    return int(text)


def read_usage(paths: CgroupPaths) -> CgroupUsage:
    """Read the sandbox's cgroup files. OSError when the cgroup is gone."""
    stats = parse_memory_stat((paths.memory / "memory.stat").read_text())
    if paths.version == 1:
        cpu_ns = _read_int(paths.cpu / "cpuacct.usage") or 0
        usage = _read_int(paths.memory / "memory.usage_in_bytes") or 0
        limit = _read_int(paths.memory / "memory.limit_in_bytes")
        cache = stats.get("total_cache", stats.get("cache", 0))
        inactive = stats.get("total_inactive_file", stats.get("inactive_file", 0))
    else:
        cpu_ns = parse_memory_stat((paths.cpu / "cpu.stat").read_text()).get("usage_usec", 0) * 1000
        usage = _read_int(paths.memory / "memory.current") or 0
        limit = _read_int(paths.memory / "memory.max")
        cache = stats.get("file", 0)
        inactive = stats.get("inactive_file", 0)
    if limit is not None and limit >= _NO_LIMIT:
        limit = None
    return CgroupUsage(
        cpu_ns=cpu_ns, mem_usage=usage, mem_limit=limit, mem_cache=cache, mem_inactive_file=inactive
    )


def cpu_percent(cpu_ns_delta: int, wall_s: float, cpu_count: int) -> float:
    """CPU use over an interval as a percentage of the sandbox's CPUs (0..100), like E2B's cpuUsedPct."""
    if wall_s <= 0 or cpu_count <= 0:
        return 0.0
    pct = cpu_ns_delta / (wall_s * 1e9 * cpu_count) * 100.0
    return round(min(100.0, max(0.0, pct)), 2)


def freezer_state(paths: CgroupPaths) -> str:
    """`THAWED`, `FREEZING` or `FROZEN` (v1 names, also for v2's cgroup.freeze)."""
    if paths.version == 1:
        return (paths.freezer / "freezer.state").read_text().strip()
    return "FROZEN" if (paths.freezer / "cgroup.freeze").read_text().strip() == "1" else "THAWED"

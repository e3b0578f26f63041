"""cgroups of sandboxes: where crun puts them, what they use (metrics), which CPUs they get.

    readings.read_usage(locate_cgroups("corral-corral0", sandbox_id))  -> CgroupUsage
    cpuset.pick_cpus(host_cpus(), load, n)                              -> the n least loaded CPUs

`freezer.freeze` / `freezer.thaw` pause and resume a sandbox by writing its freezer cgroup, as
`crun pause` would, without spawning a process; `freezer_state` reads what the kernel says.
"""

from corral.node.cgroups.cpuset import (
    cpu_online_text,
    filter_cpuinfo,
    format_cpuset,
    host_cpus,
    parse_cpuset,
    pick_cpus,
)
from corral.node.cgroups.freezer import FreezeTimeout, freeze, thaw
from corral.node.cgroups.readings import (
    CgroupPaths,
    CgroupUsage,
    cpu_percent,
    freezer_state,
    locate_cgroups,
    parse_memory_stat,
    read_usage,
)

__all__ = [
    "CgroupPaths",
    "CgroupUsage",
    "FreezeTimeout",
    "cpu_online_text",
    "cpu_percent",
    "filter_cpuinfo",
    "format_cpuset",
    "freeze",
    "freezer_state",
    "host_cpus",
    "locate_cgroups",
    "parse_cpuset",
    "parse_memory_stat",
    "pick_cpus",
    "read_usage",
    "thaw",
]

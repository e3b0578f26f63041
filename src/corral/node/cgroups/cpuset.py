"""Which host CPUs a sandbox runs on, and what it is told about them.

A sandbox with `cpu_count = n` is pinned (cpuset) to the n host CPUs that carry the fewest other
sandboxes, so `nproc` inside says n and sandboxes spread over the host. Tools that read
`/proc/cpuinfo` or `/sys/devices/system/cpu/online` (Python's `os.cpu_count()`, Node's
`os.cpus()`) see the same n CPUs through files bound over those paths: `filter_cpuinfo` and
`cpu_online_text` make their contents (CPUs renumbered 0..n-1, as lxcfs does). Pure functions
apart from `host_cpus`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["cpu_online_text", "filter_cpuinfo", "format_cpuset", "host_cpus", "parse_cpuset", "pick_cpus"]

_PROCESSOR = re.compile(r"^processor\s*:\s*(\d+)\s*$", re.MULTILINE)


def host_cpus() -> tuple[int, ...]:
    """The CPUs this process may run on (the server's own affinity), ascending."""
    return tuple(sorted(os.sched_getaffinity(0)))


def parse_cpuset(text: str) -> tuple[int, ...]:
    """`"0-2,5"` -> (0, 1, 2, 5). Empty text is no CPU."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        first, sep, last = part.partition("-")
        if sep:
            lo, hi = int(first), int(last)
            if hi < lo:
                raise ValueError(f"invalid cpuset range {part!r}")
            cpus.update(range(lo, hi + 1))
        else:
            cpus.add(int(first))
    return tuple(sorted(cpus))


def format_cpuset(cpus: Iterable[int]) -> str:
    """(0, 1, 2, 5) -> `"0-2,5"` (the kernel's list format)."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def pick_cpus(host: Sequence[int], load: Mapping[int, int], count: int) -> tuple[int, ...]:
    """The `count` host CPUs with the fewest sandboxes on them (ties: lowest number), ascending.

    Asking for more CPUs than the host has gives all of them.
    """
    if not host:
        raise ValueError("the host has no CPU to give")
    count = max(1, min(count, len(host)))
    ranked = sorted(host, key=lambda cpu: (load.get(cpu, 0), cpu))
    return tuple(sorted(ranked[:count]))


def filter_cpuinfo(text: str, cpus: Iterable[int]) -> str:
    """The host's /proc/cpuinfo with only the blocks of `cpus`, renumbered from 0.

    A block is the text from one `processor : N` line to the next. Architectures whose cpuinfo
    has no per-processor blocks are returned unchanged.
    """
    wanted = set(cpus)
    starts = [m for m in _PROCESSOR.finditer(text)]
    if not starts:
        return text
    head = text[: starts[0].start()]
    blocks: list[str] = []
    for i, match in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(text)
        if int(match.group(1)) in wanted:
            block = text[match.start() : end]
            blocks.append(_PROCESSOR.sub(f"processor\t: {len(blocks)}", block, count=1))
    body = "".join(blocks)
    if body and not body.endswith("\n\n"):
        body = body.rstrip("\n") + "\n\n"
    return head + body


def cpu_online_text(count: int) -> str:
    """/sys/devices/system/cpu/online for a sandbox that sees `count` CPUs: `0` or `0-(n-1)`."""
    return ("0" if count <= 1 else f"0-{count - 1}") + "\n"

"""envd's `GET /metrics`: CPU, memory and disk use of one sandbox.

Shape (spec/envd/envd.yaml `Metrics`): `{ts, cpu_count, cpu_used_pct, mem_total, mem_used,
mem_cache, mem_total_mib, mem_used_mib, disk_used, disk_total}`.

The numbers come from the node (`EnvdSandbox.usage()` = `Node.usage`: the sandbox's cgroup
counters, its CPU count and its disk). `cpu_used_pct` is the cgroup's CPU time over the wall time
since the previous sample of this sandbox (a 100 ms window on the first call), as a percentage of
its CPUs; `mem_total` is the memory limit (the host's memory when unlimited); `mem_used` is usage
minus inactive page cache (as `docker stats` counts it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
import weakref
from typing import Any

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from corral.core.errors import CorralError
from corral.node.cgroups.readings import cpu_percent
from corral.node.envd.context import EnvdSandbox, sandbox_from_scope

__all__ = ["Sample", "metrics", "metrics_payload"]

MIB = 1024 * 1024
_FIRST_WINDOW_S = 0.1


@dataclasses.dataclass(frozen=True, slots=True)
class Sample:
    at: float  # time.monotonic()
    usage: Any  # corral.node.sandboxes.SandboxUsage


def metrics_payload(
    previous: Sample, current: Sample, *, host_memory: int, now: float
) -> dict[str, int | float]:
    """envd's Metrics object from two samples of one sandbox. Pure."""
    usage = current.usage
    cgroup = usage.cgroup
    cpu_count = max(1, usage.cpu_count)
    cpu_pct = cpu_percent(cgroup.cpu_ns - previous.usage.cgroup.cpu_ns, current.at - previous.at, cpu_count)
    mem_total = min(cgroup.mem_limit, host_memory) if cgroup.mem_limit else host_memory
    mem_used = cgroup.mem_used
    return {
        "ts": int(now),
        "cpu_count": cpu_count,
        "cpu_used_pct": cpu_pct,
        "mem_total": mem_total,
        "mem_used": mem_used,
        "mem_cache": cgroup.mem_cache,
        "mem_total_mib": mem_total // MIB,
        "mem_used_mib": mem_used // MIB,
        "disk_used": usage.disk_used,
        "disk_total": usage.disk_total,
    }


_last_samples: weakref.WeakKeyDictionary[EnvdSandbox, Sample] = weakref.WeakKeyDictionary()


def _sample(sandbox: EnvdSandbox) -> Sample:
    assert sandbox.usage is not None
    return Sample(at=time.monotonic(), usage=sandbox.usage())


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


async def metrics(request: Request) -> Response:
    """GET /metrics of the sandbox in the request's scope."""
    sandbox = sandbox_from_scope(request.scope)
    if sandbox.usage is None:
        return JSONResponse({"code": 503, "message": "metrics are not available for this sandbox"}, 503)
    previous = _last_samples.get(sandbox)
    try:
        current = await anyio.to_thread.run_sync(_sample, sandbox)
        if previous is None or current.at - previous.at < _FIRST_WINDOW_S / 2:
            previous = current
            await asyncio.sleep(_FIRST_WINDOW_S)
            current = await anyio.to_thread.run_sync(_sample, sandbox)
    except (OSError, CorralError):
        return JSONResponse({"code": 503, "message": "the sandbox's usage cannot be read now"}, 503)
    _last_samples[sandbox] = current
    return JSONResponse(metrics_payload(previous, current, host_memory=_host_memory(), now=time.time()))

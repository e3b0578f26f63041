"""Background work of the control plane: timeouts and metrics sampling, in one task group.

    scheduler = Scheduler(expire=service.expire_due, sampler=MetricsSampler(node, store))
    await scheduler.run()        # until cancelled; both loops live and die together

`MetricsSampler` reads each running sandbox's cgroups and disk every `interval_s` (2 s) and stores
one `MetricRow` per sandbox: CPU % over the interval (of the sandbox's CPUs), memory used (usage
minus inactive file cache, as `docker stats`), its limit, page cache, and the bytes used / total of
the sandbox's own disk (its writable layer). Samples are kept as long as the sandbox lives.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from corral.core.errors import NotFound
from corral.node.cgroups import cpu_percent
from corral.server.store import MetricRow

__all__ = ["DEFAULT_SAMPLE_INTERVAL_S", "MetricsSampler", "Scheduler"]

log = logging.getLogger(__name__)

DEFAULT_SAMPLE_INTERVAL_S = 2.0


def _host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


class MetricsSampler:
    def __init__(self, node: Any, store: Any, interval_s: float = DEFAULT_SAMPLE_INTERVAL_S) -> None:
        self.node = node
        self.store = store
        self.interval_s = interval_s
        self._last: dict[
            str, tuple[int, float]
        ] = {}  # sandbox id -> (cpu ns, monotonic s) of the last sample
        self._host_memory = _host_memory()

    def readings(self, sandbox_ids: Iterable[str]) -> list[MetricRow]:
        """One sample of each sandbox that is running (others are skipped)."""
        rows: list[MetricRow] = []
        now = datetime.now(UTC)
        for sandbox_id in sandbox_ids:
            mono = time.monotonic()
            try:
                usage = self.node.usage(sandbox_id)
            except (OSError, NotFound):
                continue  # gone or going: its cgroup is not there any more
            previous = self._last.get(sandbox_id)
            cpu = usage.cgroup.cpu_ns
            pct = (
                0.0
                if previous is None
                else cpu_percent(cpu - previous[0], mono - previous[1], usage.cpu_count)
            )
            self._last[sandbox_id] = (cpu, mono)
            rows.append(
                MetricRow(
                    sandbox_id=sandbox_id,
                    ts=now,
                    cpu_count=usage.cpu_count,
                    cpu_used_pct=pct,
                    mem_used=usage.cgroup.mem_used,
                    mem_total=usage.cgroup.mem_limit or self._host_memory,
                    mem_cache=usage.cgroup.mem_cache,
                    disk_used=usage.disk_used,
                    disk_total=usage.disk_total,
                )
            )
        return rows

    def sample(self, sandbox_ids: Iterable[str] | None = None) -> int:
        """Take and store one sample of the given (default: every running) sandbox; returns how many."""
        ids = list(self.node.running_ids() if sandbox_ids is None else sandbox_ids)
        rows = self.readings(ids)
        self.store.add_metrics(rows)
        return len(rows)

    def forget(self, sandbox_id: str) -> None:
        """The sandbox stopped running (paused or killed): its next sample starts a new interval."""
        self._last.pop(sandbox_id, None)

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                # The id list is taken here, on the event loop that changes the node's sandboxes.
                await asyncio.to_thread(self.sample, self.node.running_ids())
            except Exception:  # a failed round must not end sampling
                log.exception("metrics sampling failed")
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))


class Scheduler:
    """Runs the periodic loops of the control plane until cancelled."""

    def __init__(
        self, expire: Callable[[], Awaitable[None]], sampler: MetricsSampler, expiry_interval_s: float = 0.25
    ) -> None:
        self.expire = expire
        self.sampler = sampler
        self.expiry_interval_s = expiry_interval_s

    async def _expiry(self) -> None:
        while True:
            try:
                await self.expire()
            except Exception:
                log.exception("expiring sandboxes failed")
            await asyncio.sleep(self.expiry_interval_s)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._expiry(), name="sandbox-expiry")
            group.create_task(self.sampler.run(), name="sandbox-metrics")

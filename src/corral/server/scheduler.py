"""Background work of the control plane: timeouts and metrics sampling, in one task group.

    scheduler = Scheduler(expire=service.expire_due, sampler=MetricsSampler(node, store))
    await scheduler.run()        # until cancelled; both loops live and die together
    scheduler.clock.note(end_at) # a running sandbox's end was set: the expiry loop wakes by then

Expiry does not poll: each round (`expire(within)`) expires what is due and returns the soonest end
still to come within `ExpiryClock.safety_s`, and the loop sleeps until then. The service notes every
end it writes (create, resume, new timeout), so a nearer one wakes the loop early; `safety_s` (2 s)
bounds the sleep for ends written by anyone else (another server on the same database). A round
is one indexed query on the event loop: a few a minute instead of four a second.

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
from datetime import UTC, datetime, timedelta
from typing import Any

from corral.core.errors import NotFound
from corral.node.cgroups import cpu_percent
from corral.server.store import MetricRow

__all__ = [
    "DEFAULT_SAMPLE_INTERVAL_S",
    "EXPIRY_SAFETY_INTERVAL_S",
    "ExpiryClock",
    "MetricsSampler",
    "Scheduler",
    "expiry_delay",
]

log = logging.getLogger(__name__)

DEFAULT_SAMPLE_INTERVAL_S = 2.0
EXPIRY_SAFETY_INTERVAL_S = 2.0  # the longest the expiry loop sleeps: ends another process wrote


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


def expiry_delay(now: datetime, soonest: datetime | None, cap_s: float) -> float:
    """Seconds until the next expiry round: until `soonest` (None: no end known), at most `cap_s`."""
    if soonest is not None:
        cap_s = min(cap_s, (soonest - now).total_seconds())
    return max(0.0, cap_s)


class ExpiryClock:
    """When the expiry loop wakes: at the soonest end its last round saw or the service noted since,
    after `safety_s` at the latest. Event-loop only."""

    def __init__(self, safety_s: float = EXPIRY_SAFETY_INTERVAL_S) -> None:
        self.safety_s = safety_s
        self._noted: datetime | None = None  # the soonest end noted since the current round began
        self._changed = asyncio.Event()

    def note(self, end_at: datetime) -> None:
        """A running sandbox will end at `end_at` (created, resumed, timeout set)."""
        if self._noted is None or end_at < self._noted:
            self._noted = end_at
            self._changed.set()

    def begin_round(self) -> None:
        """A round's query is about to read every end written so far: earlier notes are in it."""
        self._noted = None

    async def sleep(self, soonest: datetime | None) -> None:
        """Until `soonest` (what the round found), a nearer noted end, or `safety_s`: the first."""
        latest = time.monotonic() + self.safety_s
        while True:
            self._changed.clear()
            if soonest is None or (self._noted is not None and self._noted < soonest):
                soonest = self._noted
            delay = expiry_delay(datetime.now(UTC), soonest, latest - time.monotonic())
            if delay <= 0:
                return
            try:
                await asyncio.wait_for(self._changed.wait(), delay)
            except TimeoutError:
                return


class Scheduler:
    """Runs the background loops of the control plane until cancelled.

    `expire(within)` expires the sandboxes that are due and returns the soonest end to come within
    `within` (None: none that soon)."""

    def __init__(
        self,
        expire: Callable[[timedelta], Awaitable[datetime | None]],
        sampler: MetricsSampler,
        clock: ExpiryClock | None = None,
    ) -> None:
        self.expire = expire
        self.sampler = sampler
        self.clock = clock if clock is not None else ExpiryClock()

    async def _expiry(self) -> None:
        while True:
            self.clock.begin_round()  # `expire` queries before its first await: nothing slips between
            soonest = None
            try:
                soonest = await self.expire(timedelta(seconds=self.clock.safety_s))
            except Exception:
                log.exception("expiring sandboxes failed")
            await self.clock.sleep(soonest)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._expiry(), name="sandbox-expiry")
            group.create_task(self.sampler.run(), name="sandbox-metrics")

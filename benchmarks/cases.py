"""The measurements. Each takes the `Bench` (our server, the peer, run counts) and returns samples.

Timing is wall-clock around the SDK call as a user makes it (`time.perf_counter`), in the bench's
own process. Before every timed step of ours and of the peer, `Bench.settle` waits until our
server is idle (killed sandboxes torn down, the warm pool refilled), so neither side measures the
other's or our own background work. Ours and the peer alternate, so drift of this shared machine
affects both alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from benchmarks.peer import Podman
from benchmarks.stats import rate_mb_s
from corral import AsyncSandbox, Sandbox
from corral.sdk import NotSupportedException
from corral.testing import ServerProcess

__all__ = [
    "Bench",
    "concurrent_create",
    "create_exec_kill",
    "exec_latency",
    "file_throughput",
    "idle_memory",
    "pause_resume",
    "template_rebuild",
]

T = TypeVar("T")
FILE_SIZE = 100 * 2**20
SETTLE_TIMEOUT_S = 15.0
EXEC_BREATH_S = 0.02  # pause before each timed exec sample, ours and the peer's


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


@dataclasses.dataclass
class Bench:
    server: ServerProcess
    peer: Podman | None
    runs: int
    pool_size: int
    log: Any = print

    @property
    def options(self) -> dict[str, Any]:
        return {"api_url": self.server.url, "api_key": self.server.api_key}

    def _sandbox_dirs(self) -> int:
        root = self.server.home / "sandboxes"
        return sum(1 for _ in root.iterdir()) if root.is_dir() else 0

    def settle(self, live: int = 0) -> None:
        """Wait until the server holds exactly `live` sandboxes of ours plus a full warm pool,
        with nothing being torn down (sandbox dirs go last in a teardown), then a short breath."""
        wanted = live + self.pool_size
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while self._sandbox_dirs() != wanted and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.05)

    def create(self, **kw: Any) -> Sandbox:
        return Sandbox.create("base", **kw, **self.options)


# -- create → exec → kill, and the peer's `podman run` ------------------------------------------


def create_exec_kill(bench: Bench) -> tuple[list[float], list[float]]:
    ours: list[float] = []
    peer: list[float] = []
    for i in range(bench.runs):
        bench.settle()
        started = time.perf_counter()
        sandbox = bench.create()
        sandbox.commands.run("true")
        sandbox.kill()
        ours.append(_ms(started))
        sandbox.close()
        if bench.peer is not None:
            bench.settle()
            peer.append(bench.peer.run_true())
        if (i + 1) % 10 == 0:
            bench.log(f"  create→exec→kill {i + 1}/{bench.runs}")
    return ours, peer


# -- exec on a live sandbox, and `podman exec` -----------------------------------------------------


def exec_latency(bench: Bench) -> tuple[list[float], list[float]]:
    ours: list[float] = []
    peer: list[float] = []
    runs = bench.runs * 2
    with contextlib.ExitStack() as stack:
        sandbox = bench.create()
        stack.callback(sandbox.close)
        stack.callback(sandbox.kill)
        name = stack.enter_context(bench.peer.running()) if bench.peer is not None else None
        for _ in range(5):  # warm-up: connections, page cache
            sandbox.commands.run("true")
        bench.settle(live=1)
        for _ in range(runs):
            # A breath before each timed step of either side: the processes a `podman exec`
            # leaves behind finish their work then, instead of inside our next sample (and ours
            # inside the peer's).
            time.sleep(EXEC_BREATH_S)
            started = time.perf_counter()
            sandbox.commands.run("true")
            ours.append(_ms(started))
            if bench.peer is not None and name is not None:
                time.sleep(EXEC_BREATH_S)
                peer.append(bench.peer.exec_true(name))
    return ours, peer


# -- files ---------------------------------------------------------------------------------------


def file_throughput(bench: Bench, repeats: int = 5) -> tuple[float, float]:
    """(write, read) MB/s of a 100 MB file through files.write / files.read, medians of `repeats`."""
    data = os.urandom(FILE_SIZE)
    writes: list[float] = []
    reads: list[float] = []
    with bench.create(timeout=600) as sandbox:
        bench.settle(live=1)
        for i in range(repeats):
            path = f"/home/user/bench-{i}.bin"
            started = time.perf_counter()
            sandbox.files.write(path, data)
            writes.append(time.perf_counter() - started)
            started = time.perf_counter()
            got = sandbox.files.read(path, format="bytes")
            reads.append(time.perf_counter() - started)
            if len(got) != FILE_SIZE:
                raise RuntimeError(f"read back {len(got)} bytes of {FILE_SIZE}")
            sandbox.files.remove(path)
    writes.sort()
    reads.sort()
    return rate_mb_s(FILE_SIZE, writes[len(writes) // 2]), rate_mb_s(FILE_SIZE, reads[len(reads) // 2])


# -- 50 creates at once -----------------------------------------------------------------------------


async def _create_many(bench: Bench, count: int) -> tuple[float, list[Any]]:
    """Create `count` at once: (wall seconds, sandboxes or exceptions). Kill them in the same
    event loop (`_kill_all`): their clients belong to it."""
    started = time.perf_counter()
    results = await asyncio.gather(
        *(AsyncSandbox.create("base", timeout=300, **bench.options) for _ in range(count)), return_exceptions=True
    )
    return time.perf_counter() - started, list(results)


async def _kill_all(sandboxes: list[Any]) -> None:
    async def kill(sandbox: AsyncSandbox) -> None:
        with contextlib.suppress(Exception):
            await sandbox.kill()
        await sandbox.aclose()

    await asyncio.gather(*(kill(s) for s in sandboxes if isinstance(s, AsyncSandbox)))


def concurrent_create(bench: Bench, count: int = 50) -> dict[str, Any]:
    async def create_and_kill() -> tuple[float, list[Any]]:
        wall, results = await _create_many(bench, count)
        await _kill_all(results)
        return wall, results

    bench.settle()
    wall, results = asyncio.run(create_and_kill())
    errors = [r for r in results if not isinstance(r, AsyncSandbox)]
    for error in errors[:3]:
        bench.log(f"  concurrent create failed: {error!r}")
    return {"wall_s": round(wall, 3), "errors": len(errors)}


# -- memory of idle sandboxes ---------------------------------------------------------------------


_KERNEL_FIELDS = ("SUnreclaim", "KernelStack", "PageTables", "Percpu")  # kernel memory nobody can reclaim


def _meminfo() -> dict[str, int]:
    values = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        values[name] = int(rest.split()[0]) * 1024
    return values


def _steady_meminfo(samples: int = 5) -> dict[str, int]:
    """The median of a few readings of MemAvailable and of the kernel's unreclaimable memory."""
    readings = []
    for _ in range(samples):
        info = _meminfo()
        readings.append((info["MemAvailable"], sum(info.get(f, 0) for f in _KERNEL_FIELDS)))
        time.sleep(0.2)
    available = sorted(r[0] for r in readings)[len(readings) // 2]
    kernel = sorted(r[1] for r in readings)[len(readings) // 2]
    return {"available": available, "kernel": kernel}


def _cgroup_bytes(bridge: str, sandbox_id: str) -> int:
    path = Path("/sys/fs/cgroup/memory") / f"corral-{bridge}" / sandbox_id / "memory.usage_in_bytes"
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return 0


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _with_idle_sandboxes(bench: Bench, count: int, measure: Callable[[list[Any]], T]) -> T:
    """`measure(sandboxes)` while `count` idle sandboxes exist (created 10 at a time), then kill them."""

    async def run() -> T:
        made: list[Any] = []
        try:
            for start in range(0, count, 10):
                _, batch = await _create_many(bench, min(10, count - start))
                made.extend(batch)
            failed = [s for s in made if not isinstance(s, AsyncSandbox)]
            if failed:
                raise RuntimeError(f"{len(failed)} of {count} creates failed: {failed[0]!r}")
            return measure(made)  # blocking, on purpose: nothing else runs meanwhile
        finally:
            await _kill_all(made)

    return asyncio.run(run())


def idle_memory(bench: Bench, count: int = 100, rounds: int = 2) -> tuple[float, dict[str, Any]]:
    """Host memory per idle sandbox in MiB, the larger of two estimates (each a mean of `rounds`):

    - top-down: MemAvailable without them (mean of the readings before and after) minus with
      `count` idle sandboxes, ÷ count. What the issue asks for, but everything else running on
      the machine moves MemAvailable too, by tens of MB.
    - bottom-up: what they hold: the kernel's unreclaimable memory growth (slab, kernel stacks,
      page tables, per-cpu: namespaces, mounts, loop devices, veths), plus their own cgroups'
      usage, plus the server's RSS growth, ÷ count. An upper bound: kernel memory charged to a
      sandbox's cgroup is counted twice.
    """
    assert bench.server.proc is not None
    server_pid = bench.server.proc.pid
    bench.settle()
    baseline = _steady_meminfo()
    rss_before = _rss_bytes(server_pid)

    def measure(sandboxes: list[Any]) -> dict[str, int]:
        bench.settle(live=count)
        time.sleep(2.0)  # let the kernel's lazy work (ext4 lazy init, page cache) land
        during = _steady_meminfo()
        during["cgroups"] = sum(_cgroup_bytes(bench.server.bridge, s.sandbox_id) for s in sandboxes)
        during["rss"] = _rss_bytes(server_pid) - rss_before
        return during

    top_down: list[float] = []
    bottom_up: list[float] = []
    drift = 0.0
    parts: dict[str, Any] = {}
    for _ in range(rounds):
        during = _with_idle_sandboxes(bench, count, measure)
        bench.settle()
        after = _steady_meminfo()
        top_down.append(((baseline["available"] + after["available"]) / 2 - during["available"]) / count / 2**20)
        kernel = (during["kernel"] - (baseline["kernel"] + after["kernel"]) / 2) / count / 2**20
        cgroups, rss = during["cgroups"] / count / 2**20, during["rss"] / count / 2**20
        bottom_up.append(kernel + cgroups + rss)
        parts = {"kernel_mb": kernel, "cgroups_mb": cgroups, "server_rss_mb": rss}
        drift = max(drift, abs(after["available"] - baseline["available"]) / 2**20)
        baseline = after
    parts.update(
        top_down_mb=round(sum(top_down) / rounds, 2),
        bottom_up_mb=round(sum(bottom_up) / rounds, 2),
        baseline_drift_mb=drift,
    )
    return round(max(parts["top_down_mb"], parts["bottom_up_mb"]), 2), parts


# -- pause and resume -------------------------------------------------------------------------------


def pause_resume(bench: Bench) -> tuple[list[float] | None, list[float] | None]:
    """ms of `sandbox.pause()` and of `Sandbox.connect(id)` resuming it; (None, None) when the
    server cannot pause."""
    pauses: list[float] = []
    resumes: list[float] = []
    with bench.create() as sandbox:
        bench.settle(live=1)
        for _ in range(max(10, bench.runs // 2)):
            started = time.perf_counter()
            try:
                sandbox.pause()
            except NotSupportedException:
                return None, None
            pauses.append(_ms(started))
            started = time.perf_counter()
            resumed = Sandbox.connect(sandbox.sandbox_id, **bench.options)
            resumes.append(_ms(started))
            resumed.close()
        sandbox.commands.run("true")  # it really runs again
    return pauses, resumes


# -- template rebuild -----------------------------------------------------------------------------


def template_rebuild(bench: Bench) -> float | None:
    """Seconds of the official SDK's `Template.build` when nothing changed (every step cached);
    None when this server cannot build templates."""
    os.environ.update(E2B_API_URL=bench.server.url, E2B_SANDBOX_URL=bench.server.url, E2B_API_KEY=bench.server.api_key)
    os.environ.pop("E2B_DOMAIN", None)
    try:
        from e2b import Template
    except ImportError:
        return None
    template = (
        Template()
        .from_template("base")
        .run_cmd("echo corral-bench > /home/user/bench-step.txt")
        .set_envs({"CORRAL_BENCH": "1"})
    )
    name = "corral-bench-rebuild"
    try:
        Template.build(template, name)  # the first build (or an earlier bench's): fills the cache
        started = time.perf_counter()
        Template.build(template, name)
        return round(time.perf_counter() - started, 3)
    except Exception as exc:  # noqa: BLE001 - no template support: recorded as null, with the reason shown
        bench.log(f"  template build failed: {exc!r}")
        return None

"""`ProcessTable` keeps ended processes connectable for RETAIN_ENDED_S, then forgets them (oldest
first, without scanning every process), and never drops a newer process that reused a pid."""

from __future__ import annotations

import asyncio
import types
from collections.abc import Sequence

import pytest
from protobuf import Oneof

from corral.node.envd import process as process_module
from corral.node.envd.process import RETAIN_ENDED_S, ManagedProcess, ProcessTable
from corral.node.runtime.base import ExitStatus
from corral.spec._generated.process import process_pb as pb
from corral.spec._generated.process.process_pb import ProcessSelector


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.exited = asyncio.Event()

    def output_fds(self) -> Sequence[tuple[str, int]]:
        return ()

    async def wait(self) -> ExitStatus:
        await self.exited.wait()
        return ExitStatus(exit_code=0)

    def close(self) -> None:
        pass

    def send_signal(self, signum: int) -> None:
        self.exited.set()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(process_module, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    return clock


def _by_pid(pid: int) -> ProcessSelector:
    return ProcessSelector(selector=Oneof("pid", pid))


async def _run(table: ProcessTable, pid: int) -> tuple[ManagedProcess, FakeProcess]:
    proc = FakeProcess(pid)
    mp = ManagedProcess(proc, pb.ProcessConfig(cmd="true"), None, False)  # type: ignore[arg-type]
    table.add(mp, None)
    return mp, proc


async def _end(mp: ManagedProcess, proc: FakeProcess) -> None:
    proc.exited.set()
    await mp.done.wait()
    await asyncio.sleep(0)  # the table's pump wrapper notes the end


async def test_ended_processes_are_kept_for_a_while_then_forgotten(clock: Clock) -> None:
    table = ProcessTable()
    first, first_proc = await _run(table, 10)
    await _end(first, first_proc)
    clock.now += RETAIN_ENDED_S / 2
    second, second_proc = await _run(table, 11)
    await _end(second, second_proc)
    assert table.select(_by_pid(10), include_ended=True) is first

    clock.now += RETAIN_ENDED_S / 2 + 1  # the first is past its retention, the second is not
    third, third_proc = await _run(table, 12)
    with pytest.raises(Exception, match="not found"):
        table.select(_by_pid(10), include_ended=True)
    assert table.select(_by_pid(11), include_ended=True) is second
    assert table.select(_by_pid(12)) is third
    await _end(third, third_proc)
    table.close()


async def test_a_reused_pid_keeps_the_newer_process(clock: Clock) -> None:
    table = ProcessTable()
    old, old_proc = await _run(table, 7)
    await _end(old, old_proc)
    new, new_proc = await _run(table, 7)  # the sandbox's pid counter wrapped around
    clock.now += RETAIN_ENDED_S + 1
    table.select(_by_pid(7))  # prunes: the ended old one goes, the running new one stays
    assert table.select(_by_pid(7)) is new
    await _end(new, new_proc)
    table.close()

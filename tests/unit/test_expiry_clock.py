"""The expiry loop sleeps until the soonest end instead of polling: `expiry_delay`, `ExpiryClock`, and
the service's loop on a real store and an in-memory node — timeouts still fire on time, whether the
end was set at create, by a new timeout or at a resume; ends written by another process are found
within the safety interval."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from corral.core.sandbox import SandboxState
from corral.core.settings import Settings, load_settings
from corral.node.storage.templates import TemplateManifest, TemplateStore
from corral.server.scheduler import ExpiryClock, expiry_delay
from corral.server.service import SandboxService
from corral.server.store import SandboxRow, Store
from tests.unit.test_lifecycle_service import BASE_LAYER, FakeNode, _req

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _in(seconds: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)


def test_expiry_delay_is_the_soonest_end_within_the_cap() -> None:
    assert expiry_delay(NOW, None, 2.0) == 2.0
    assert expiry_delay(NOW, NOW + dt.timedelta(seconds=0.5), 2.0) == 0.5
    assert expiry_delay(NOW, NOW + dt.timedelta(seconds=60), 2.0) == 2.0
    assert expiry_delay(NOW, NOW - dt.timedelta(seconds=1), 2.0) == 0.0  # overdue: at once
    assert expiry_delay(NOW, None, -0.1) == 0.0


async def _timed(clock: ExpiryClock, soonest: dt.datetime | None) -> float:
    started = time.monotonic()
    await clock.sleep(soonest)
    return time.monotonic() - started


async def test_clock_sleeps_until_the_soonest_end_or_the_safety_interval() -> None:
    clock = ExpiryClock(safety_s=0.3)
    assert 0.25 <= await _timed(clock, None) < 2.0
    assert 0.25 <= await _timed(clock, _in(60)) < 2.0
    assert 0.08 <= await _timed(clock, _in(0.1)) < 0.25 + 1.0
    assert await _timed(clock, _in(-1)) < 0.05


async def test_a_nearer_noted_end_wakes_the_clock_a_farther_one_does_not() -> None:
    clock = ExpiryClock(safety_s=30)
    clock.begin_round()
    sleeper = asyncio.ensure_future(_timed(clock, _in(0.6)))
    await asyncio.sleep(0.05)
    clock.note(_in(20))  # farther than the round's answer: keeps sleeping to that
    await asyncio.sleep(0.05)
    assert not sleeper.done()
    clock.note(_in(0.1))
    assert 0.15 <= await asyncio.wait_for(sleeper, 5) < 0.55


async def test_an_end_noted_during_a_round_counts_until_the_next_round() -> None:
    clock = ExpiryClock(safety_s=30)
    clock.begin_round()
    clock.note(_in(0.05))  # e.g. a create while the round was expiring others: not in its query
    assert await asyncio.wait_for(_timed(clock, None), 5) < 1.0
    clock.begin_round()  # the next round's query sees it: the note is done with
    sleeper = asyncio.ensure_future(_timed(clock, None))
    await asyncio.sleep(0.2)
    assert not sleeper.done()
    sleeper.cancel()


# --- the service's loop ------------------------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings({"home": tmp_path / "home"}, env={})


@pytest.fixture
def service(settings: Settings) -> Iterator[SandboxService]:
    store = Store.open(settings)
    templates = TemplateStore(settings)
    templates.save(TemplateManifest(template_id="base", names=("base",), layers=(BASE_LAYER,)))
    service = SandboxService(settings, store, FakeNode(settings.layers_dir), templates, SandboxRow)
    store.ensure_default_team("e2b_" + "1" * 40)
    yield service
    store.close()


class Rounds:
    """Counts the expiry queries."""

    def __init__(self, store: Store) -> None:
        self.count = 0
        real = store.expired

        def counted(now: dt.datetime) -> list[SandboxRow]:
            self.count += 1
            return real(now)

        store.expired = counted  # type: ignore[method-assign]


@contextlib.asynccontextmanager
async def _expiry(service: SandboxService, safety_s: float) -> AsyncIterator[Rounds]:
    service.scheduler.clock = ExpiryClock(safety_s=safety_s)
    rounds = Rounds(service.store)
    task = asyncio.create_task(service.run_expiry())
    await _until(lambda: rounds.count == 1)  # the first round is done: what follows it must wake it
    await asyncio.sleep(0.05)
    try:
        yield rounds
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _until(check: Callable[[], bool], timeout_s: float = 5.0) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout_s, "timed out"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def _gone(service: SandboxService, sandbox_id: str) -> Callable[[], bool]:
    return lambda: service.store.get_sandbox(sandbox_id) is None


async def test_an_idle_loop_does_not_poll(service: SandboxService) -> None:
    async with _expiry(service, safety_s=30) as rounds:
        await asyncio.sleep(0.6)
    assert rounds.count == 1  # was a query every 250 ms


async def test_a_created_sandbox_expires_on_time_without_polling(service: SandboxService) -> None:
    team = service.store.default_team_id()
    async with _expiry(service, safety_s=30) as rounds:  # no safety net in this test's time
        keep = await service.create(team, _req(timeout=600))
        row = await service.create(team, _req(timeout=1))
        waited = await _until(_gone(service, row.sandbox_id))
        assert 0.5 <= waited < 4.0
        assert rounds.count <= 4
    assert (await service.get(team, keep.sandbox_id)).state is SandboxState.RUNNING


async def test_a_shortened_timeout_and_a_resume_wake_the_loop(service: SandboxService) -> None:
    team = service.store.default_team_id()
    shortened = await service.create(team, _req(timeout=600))
    resumed = await service.create(team, _req(timeout=600, autoPause=True))
    await service.pause(team, resumed.sandbox_id, keep_memory=True)
    async with _expiry(service, safety_s=30):
        await service.set_timeout(team, shortened.sandbox_id, 1)
        await service.connect(team, resumed.sandbox_id, 1)  # resumes it for 1 s, then auto-pause
        await _until(_gone(service, shortened.sandbox_id))
        await _until(lambda: service.store.get_sandbox(resumed.sandbox_id).state is SandboxState.PAUSED)


async def test_ends_written_by_another_process_are_found_by_the_safety_net(service: SandboxService) -> None:
    team = service.store.default_team_id()
    row = await service.create(team, _req(timeout=600))
    async with _expiry(service, safety_s=0.3):
        await asyncio.sleep(0.05)
        service.store.update_sandbox(row.sandbox_id, end_at=_in(-1))  # not through this service
        assert await _until(_gone(service, row.sandbox_id)) < 3.0

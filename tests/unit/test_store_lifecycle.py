"""The store's lifecycle tables (migration 0002): snapshots with pagination, owned layers, metrics, logs."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from corral.core.errors import InvalidArgument
from corral.core.sandbox import SandboxState
from corral.core.settings import load_settings
from corral.server.store import MetricRow, SandboxRow, SnapshotRow, Store

T0 = datetime(2025, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store.open(load_settings({"home": tmp_path / "home"}, env={}))
    yield opened
    opened.close()


@pytest.fixture
def team(store: Store) -> str:
    store.ensure_default_team("e2b_" + "2" * 40)
    team_id = store.default_team_id()
    assert team_id is not None
    return team_id


def _sandbox(store: Store, team: str, sandbox_id: str, layers: tuple[str, ...] = ("a" * 64,)) -> None:
    store.insert_sandbox(
        SandboxRow(sandbox_id=sandbox_id, team_id=team, template_id="base", state=SandboxState.RUNNING,
                   started_at=T0, end_at=T0 + timedelta(minutes=5), layers=layers)
    )  # fmt: skip


def test_new_columns_round_trip(store: Store, team: str) -> None:
    _sandbox(store, team, "s1", ("a" * 64, "b" * 64))
    row = store.update_sandbox(
        "s1", state=SandboxState.PAUSED, paused_memory=False, auto_resume=True, timeout_s=9
    )
    assert row is not None
    assert (row.layers, row.paused_memory, row.auto_resume, row.timeout_s, row.auto_pause_memory) == (
        ("a" * 64, "b" * 64), False, True, 9, True,
    )  # fmt: skip


def test_snapshots_page_newest_first(store: Store, team: str) -> None:
    for i in range(5):
        store.insert_snapshot(
            SnapshotRow(
                f"snap{i}", team, "s1" if i % 2 else "s2", f"n{i}", "c" * 64, T0 + timedelta(seconds=i)
            )
        )
    seen, token = [], None
    while True:
        rows, token = store.list_snapshots(team, limit=2, next_token=token)
        seen += [r.snapshot_id for r in rows]
        if token is None:
            break
    assert seen == ["snap4", "snap3", "snap2", "snap1", "snap0"]
    assert [r.snapshot_id for r in store.list_snapshots(team, sandbox_id="s1")[0]] == ["snap3", "snap1"]
    assert [r.snapshot_id for r in store.list_snapshots(team, names={"n2"})[0]] == ["snap2"]
    assert [r.snapshot_id for r in store.list_snapshots(team, names={"snap0"})[0]] == ["snap0"]
    assert store.list_snapshots("other-team")[0] == []
    with pytest.raises(InvalidArgument):
        store.list_snapshots(team, next_token="not a token")
    assert store.delete_snapshot("snap0", "other-team") is None
    assert store.delete_snapshot("snap0", team) is not None
    assert store.get_snapshot("snap0") is None


def test_layers_in_use_and_owned_layers(store: Store, team: str) -> None:
    _sandbox(store, team, "live", ("a" * 64, "d" * 64))
    _sandbox(store, team, "dead", ("e" * 64,))
    store.mark_killed("dead", "test")
    store.insert_snapshot(SnapshotRow("snap", team, "live", None, "f" * 64, T0))
    assert store.layers_in_use() == {"a" * 64, "d" * 64, "f" * 64}
    store.add_owned_layer("e" * 64, "fork")
    store.add_owned_layer("e" * 64, "fork")  # idempotent
    assert store.owned_layers() == ["e" * 64]
    store.remove_owned_layer("e" * 64)
    assert store.owned_layers() == []


def test_metrics_window_and_purge(store: Store, team: str) -> None:
    _sandbox(store, team, "s1")
    rows = [MetricRow("s1", T0 + timedelta(seconds=2 * i), 2, 1.5, 10, 20, 5, 1, 100) for i in range(5)]
    store.add_metrics(rows + [MetricRow("ghost", T0, 1, 0.0, 0, 0, 0, 0, 0)])  # unknown sandbox: dropped
    assert [m.ts for m in store.metrics("s1")] == [r.ts for r in rows]
    assert len(store.metrics("s1", T0 + timedelta(seconds=2), T0 + timedelta(seconds=6))) == 3
    assert store.metrics("ghost") == []
    store.purge_sandbox_data("s1")
    assert store.metrics("s1") == []


def test_logs_filters(store: Store, team: str) -> None:
    _sandbox(store, team, "s1")
    for i, level in enumerate(["debug", "info", "warn", "error"]):
        store.add_log("s1", level, f"line {i} 50%_done", ts=T0 + timedelta(seconds=i))
    assert [r.level for r in store.logs("s1")] == ["debug", "info", "warn", "error"]
    assert [r.level for r in store.logs("s1", min_level="warn")] == ["warn", "error"]
    assert [r.message for r in store.logs("s1", forward=False, limit=1)] == ["line 3 50%_done"]
    assert [r.level for r in store.logs("s1", start=T0 + timedelta(seconds=2))] == ["warn", "error"]
    assert [r.level for r in store.logs("s1", start=T0 + timedelta(seconds=1), forward=False)] == [
        "info",
        "debug",
    ]
    assert len(store.logs("s1", search="50%_")) == 4 and store.logs("s1", search="%x") == []
    with pytest.raises(InvalidArgument):
        store.logs("s1", min_level="loud")
    with pytest.raises(ValueError):
        store.add_log("s1", "loud", "x")

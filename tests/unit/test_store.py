"""corral.server.store on a real SQLite file: migrations, WAL, keys, sandboxes, pagination."""

from __future__ import annotations

import dataclasses
import random
import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from corral.core.errors import AlreadyExists
from corral.core.ids import API_KEY_RE
from corral.core.sandbox import SandboxState
from corral.core.settings import load_settings
from corral.server import query as q
from corral.server.query import Order, SandboxQuery
from corral.server.store import (
    SandboxRow,
    Store,
    create_engine,
    current_revision,
    head_revision,
    migrate,
)
from corral.server.store import _store as store_module
from corral.server.store._models import Base, TeamModel

RUNNING, PAUSED, CREATING, KILLED = (
    SandboxState.RUNNING,
    SandboxState.PAUSED,
    SandboxState.CREATING,
    SandboxState.KILLED,
)
T0 = datetime(2025, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store.open(load_settings({"home": tmp_path / "home"}, env={}))
    yield opened
    opened.close()


@pytest.fixture
def team(store: Store) -> str:
    key = store.ensure_default_team(None)
    team_id = store.team_for_api_key(key)
    assert team_id is not None
    return team_id


def make_row(team: str, sandbox_id: str, **fields: object) -> SandboxRow:
    values: dict[str, object] = {
        "sandbox_id": sandbox_id,
        "team_id": team,
        "template_id": "base",
        "state": RUNNING,
        "started_at": T0,
        "end_at": T0 + timedelta(seconds=300),
    }
    values.update(fields)
    return SandboxRow(**values)  # type: ignore[arg-type]


# -- schema ----------------------------------------------------------------------------------------


def test_open_migrates_to_head_and_turns_on_wal(store: Store) -> None:
    assert current_revision(store.engine) == head_revision() is not None
    assert set(inspect(store.engine).get_table_names()) >= {
        "teams",
        "api_keys",
        "sandboxes",
        "alembic_version",
    }
    indexes = {ix["name"]: ix["column_names"] for ix in inspect(store.engine).get_indexes("sandboxes")}
    assert indexes["ix_sandboxes_team_id_state_started_at"] == ["team_id", "state", "started_at"]
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000


def test_migrate_is_idempotent(store: Store) -> None:
    migrate(store.engine)
    migrate(store.engine)
    assert current_revision(store.engine) == head_revision()


def test_models_match_migrations(store: Store) -> None:
    with store.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == []


def test_home_and_database_are_private(tmp_path: Path) -> None:
    home = tmp_path / "fresh"
    store = Store(load_settings({"home": home}, env={}))
    assert not home.exists()  # nothing happens before migrate()
    store.migrate()
    store.ensure_default_team(None)
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    for name in ("corral.db", "corral.db-wal", "api_key"):
        assert stat.S_IMODE((home / name).stat().st_mode) == 0o600, name
    store.close()


def test_from_engine(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'other.db'}")
    migrate(engine)
    store = Store.from_engine(engine)
    key = store.ensure_default_team(None)  # no key file: returned, not written anywhere
    assert store.team_for_api_key(key) == store.default_team_id() is not None
    assert list(tmp_path.iterdir()) and not (tmp_path / "api_key").exists()
    store.close()


# -- teams and API keys ----------------------------------------------------------------------------


def test_generated_key_is_persisted_and_reused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    settings = load_settings({"home": home}, env={})
    first_store = Store.open(settings)
    key = first_store.ensure_default_team(None)
    assert API_KEY_RE.match(key)
    key_file = home / "api_key"
    assert key_file.read_text().strip() == key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    team = first_store.team_for_api_key(key)
    assert team is not None and team == first_store.default_team_id()
    first_store.close()

    second_store = Store.open(settings)  # a later start prints the same key
    assert second_store.ensure_default_team(None) == key
    assert second_store.team_for_api_key(key) == team
    second_store.close()

    (home / "corral.db").unlink()  # database lost, key file kept: the same key works again
    third_store = Store.open(settings)
    assert third_store.ensure_default_team(None) == key
    assert third_store.team_for_api_key(key) is not None
    third_store.close()


def test_given_key_is_registered_and_not_written(tmp_path: Path) -> None:
    home = tmp_path / "home"
    store = Store.open(load_settings({"home": home}, env={}))
    given = "e2b_" + "ab" * 20
    assert store.ensure_default_team(given) == given
    assert store.ensure_default_team(given) == given
    assert store.team_for_api_key(given) == store.default_team_id()
    assert not (home / "api_key").exists()
    # Later started without CORRAL_API_KEY: a key is generated for the same team, the old one still works.
    generated = store.ensure_default_team(None)
    assert generated != given
    assert store.team_for_api_key(generated) == store.team_for_api_key(given)
    store.close()


def test_unknown_keys_have_no_team(store: Store, team: str) -> None:
    assert store.team_for_api_key("e2b_" + "0" * 40) is None
    assert store.team_for_api_key("") is None
    with store.engine.connect() as connection:
        stored = connection.exec_driver_sql("SELECT key_hash, key_prefix FROM api_keys").all()
    key = (store._key_file or Path()).read_text().strip()
    assert [(h, p) for h, p in stored] == [(store_module.hash_api_key(key), key[:8])]
    assert key not in str(stored)  # only the hash is kept


# -- sandboxes -------------------------------------------------------------------------------------


def test_insert_and_get_round_trip(store: Store, team: str) -> None:
    plus_two = timezone(timedelta(hours=2))
    row = make_row(
        team,
        "sbx1",
        started_at=T0.astimezone(plus_two),  # stored and returned as the same instant, in UTC
        alias="base",
        metadata={"k": "v", "ü": "✓"},
        env_vars={"A": "1"},
        envd_access_token="tok",
        secure=True,
        auto_pause=True,
        allow_internet_access=False,
        cpu_count=4,
        memory_mb=1024,
        disk_size_mb=4096,
        ip="10.201.0.2",
        node_id="node1",
    )
    store.insert_sandbox(row)
    got = store.get_sandbox("sbx1")
    assert got == dataclasses.replace(row, started_at=T0)
    assert got is not None and got.started_at.tzinfo is UTC and got.started_at.microsecond == 123456
    assert store.get_sandbox("sbx1", team) == got
    assert store.get_sandbox("sbx1", "another-team") is None
    assert store.get_sandbox("nope") is None


def test_insert_duplicate_is_already_exists(store: Store, team: str) -> None:
    store.insert_sandbox(make_row(team, "dup"))
    store.mark_killed("dup", "test")
    with pytest.raises(AlreadyExists):
        store.insert_sandbox(make_row(team, "dup"))


def test_naive_timestamps_are_refused(store: Store, team: str) -> None:
    with pytest.raises(Exception, match="naive"):
        store.insert_sandbox(make_row(team, "naive", started_at=datetime(2025, 1, 1)))


def test_update_is_compare_and_set(store: Store, team: str) -> None:
    store.insert_sandbox(make_row(team, "sbx"))
    paused = store.update_sandbox("sbx", expect_state=RUNNING, state=PAUSED)
    assert paused is not None and paused.state is PAUSED
    assert store.update_sandbox("sbx", expect_state=RUNNING, state=PAUSED) is None  # lost the race
    later = T0 + timedelta(hours=1)
    updated = store.update_sandbox("sbx", expect_state={RUNNING, PAUSED}, end_at=later, metadata={"n": "1"})
    assert updated is not None and updated.end_at == later and updated.metadata == {"n": "1"}
    assert store.update_sandbox("missing", end_at=later) is None
    with pytest.raises(TypeError, match="sandbox_id"):
        store.update_sandbox("sbx", sandbox_id="other")  # type: ignore[misc]
    with pytest.raises(ValueError, match="mark_killed"):
        store.update_sandbox("sbx", state=KILLED)


def test_killed_is_final_and_hidden(store: Store, team: str) -> None:
    store.insert_sandbox(make_row(team, "sbx"))
    killed = store.mark_killed("sbx", "user request", now=T0 + timedelta(seconds=5))
    assert killed is not None and killed.state is KILLED and killed.kill_reason == "user request"
    assert killed.killed_at == T0 + timedelta(seconds=5)
    assert store.mark_killed("sbx", "again") is None  # only one caller wins
    assert store.get_sandbox("sbx") is None
    assert store.get_sandbox("sbx", include_killed=True) == killed
    assert store.update_sandbox("sbx", state=RUNNING) is None  # no resurrection
    assert store.list_sandboxes(team, SandboxQuery()) == ([], None)
    assert store.live_sandboxes() == []
    assert store.purge_killed(T0) == 0
    assert store.purge_killed(T0 + timedelta(seconds=6)) == 1
    assert store.get_sandbox("sbx", include_killed=True) is None


def test_live_and_expired(store: Store, team: str) -> None:
    store.insert_sandbox(make_row(team, "creating", state=CREATING))
    store.insert_sandbox(make_row(team, "due", end_at=T0 + timedelta(seconds=10)))
    store.insert_sandbox(make_row(team, "exactly", end_at=T0 + timedelta(seconds=20)))
    store.insert_sandbox(make_row(team, "later", end_at=T0 + timedelta(seconds=21)))
    store.insert_sandbox(make_row(team, "paused", state=PAUSED, end_at=T0))
    store.insert_sandbox(make_row(team, "gone", end_at=T0))
    store.mark_killed("gone", "test")
    assert {r.sandbox_id for r in store.live_sandboxes()} == {"creating", "due", "exactly", "later", "paused"}
    assert [r.sandbox_id for r in store.expired(T0 + timedelta(seconds=20))] == ["due", "exactly"]
    assert store.expired(T0) == []


def test_list_is_scoped_to_the_team(store: Store, team: str) -> None:
    with store._sessions.begin() as session:  # the store has no API for other teams yet
        session.add(TeamModel(id="team-b", name="b", created_at=T0))
    store.insert_sandbox(make_row(team, "mine"))
    store.insert_sandbox(make_row("team-b", "theirs"))
    assert [r.sandbox_id for r in store.list_sandboxes(team, SandboxQuery())[0]] == ["mine"]
    assert [r.sandbox_id for r in store.list_sandboxes("team-b", SandboxQuery())[0]] == ["theirs"]


def _random_rows(team: str, count: int) -> list[SandboxRow]:
    rng = random.Random(11)
    rows = []
    for i in range(count):
        rows.append(
            make_row(
                team,
                f"s{i:03d}",
                started_at=T0 + timedelta(microseconds=rng.choice([0, 1, 2, 500_000, 1_000_000])),
                state=rng.choice([RUNNING, RUNNING, PAUSED, CREATING, KILLED]),
                template_id=rng.choice(["base", "tplx"]),
                alias=rng.choice(["base", None]),
                metadata=rng.choice([{}, {"k": "v"}, {"k": "v", "j": "w"}, {"k": "other"}]),
            )
        )
    return rows


QUERIES = [
    SandboxQuery(),
    SandboxQuery(limit=1),
    SandboxQuery(limit=4, order=Order.ASC),
    SandboxQuery(limit=3, states=frozenset({PAUSED})),
    SandboxQuery(limit=2, metadata={"k": "v"}),
    SandboxQuery(limit=5, metadata={"k": "v", "j": "w"}, order=Order.ASC),
    SandboxQuery(limit=3, metadata={"nope": "x"}),
    SandboxQuery(limit=3, started_after=T0 + timedelta(microseconds=2)),
    SandboxQuery(limit=2, template="tplx"),
    SandboxQuery(limit=2, template="base", metadata={"k": "other"}),
]


@pytest.mark.parametrize("query", QUERIES, ids=[str(i) for i in range(len(QUERIES))])
def test_list_pages_agree_with_the_reference(
    store: Store, team: str, query: SandboxQuery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "_SCAN_BATCH", 3)  # make the metadata scan take many batches
    rows = _random_rows(team, 60)
    for row in rows:
        store.insert_sandbox(row)
    live = [row for row in rows if row.state is not KILLED]
    while True:
        got, token = store.list_sandboxes(team, query)
        expected, expected_token = q.paginate(live, query)
        assert got == expected
        assert token == expected_token
        if token is None:
            break
        query = dataclasses.replace(query, cursor=q.decode_cursor(token))


def test_concurrent_writers_do_not_fail(store: Store, team: str) -> None:
    for i in range(4):
        store.insert_sandbox(make_row(team, f"c{i}"))
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for n in range(25):
                assert store.update_sandbox(f"c{worker}", end_at=T0 + timedelta(seconds=n)) is not None
                store.list_sandboxes(team, SandboxQuery(limit=2))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert {r.end_at for r in store.live_sandboxes()} == {T0 + timedelta(seconds=24)}

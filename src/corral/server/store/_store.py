"""The repository: every read and write of control-plane state goes through `Store`.

Calls are synchronous and short. Each call opens its own session on a pooled connection and
commits before returning, so a `Store` may be shared by threads: from async code run calls with
`anyio.to_thread.run_sync(store.method, ...)`. Calling directly on the event loop is correct too,
but blocks the loop for the call: on this machine (SQLite, WAL) about 0.5 ms for a read and 2-3 ms
for a write, mostly SQLAlchemy's own work; up to the busy timeout, 5 s, while another process holds
the write lock.

Writes are single `UPDATE ... WHERE` statements whose WHERE carries the precondition (compare and
set), so concurrent writers never lose each other's updates and a killed sandbox stays killed.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import re
import uuid
from collections.abc import Collection, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, Engine, and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from corral.core.errors import AlreadyExists, InvalidArgument, NotFound
from corral.core.ids import new_api_key
from corral.core.sandbox import SandboxState
from corral.core.settings import Settings
from corral.server.query import Cursor, Order, SandboxQuery, encode_cursor, metadata_matches
from corral.server.store._engine import create_engine
from corral.server.store._migrate import migrate
from corral.server.store._models import (
    ApiKeyModel,
    OwnedLayerModel,
    SandboxLogModel,
    SandboxMetricModel,
    SandboxModel,
    SnapshotModel,
    TeamModel,
)
from corral.server.store._rows import (
    SANDBOX_COLUMNS,
    UPDATABLE_COLUMNS,
    LogRow,
    MetricRow,
    SandboxRow,
    SnapshotRow,
)

__all__ = [
    "DEFAULT_TEAM",
    "LIVE_STATES",
    "Store",
    "decode_snapshot_cursor",
    "encode_snapshot_cursor",
    "hash_api_key",
    "validate_team_name",
]

DEFAULT_TEAM = "default"
LIVE_STATES: frozenset[SandboxState] = frozenset(
    {SandboxState.CREATING, SandboxState.RUNNING, SandboxState.PAUSED}
)
# Rows fetched per round trip while a metadata filter (applied in Python, see `list_sandboxes`) drops some.
_SCAN_BATCH = 256


def hash_api_key(key: str) -> str:
    """What the database keeps instead of a key: sha256, hex."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


_TEAM_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def validate_team_name(name: str) -> str:
    """Team names are short identifiers (letters, digits, `_.-`); InvalidArgument otherwise."""
    if not _TEAM_NAME_RE.match(name):
        raise InvalidArgument(
            f"invalid team name {name!r}: use up to 63 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return name


def _now() -> datetime:
    return datetime.now(UTC)


def _to_row(model: SandboxModel) -> SandboxRow:
    values = {name: getattr(model, name) for name in SANDBOX_COLUMNS if name != "metadata"}
    values["state"] = SandboxState(model.state)
    values["metadata"] = dict(model.metadata_ or {})
    values["env_vars"] = dict(model.env_vars or {})
    values["layers"] = None if model.layers is None else tuple(model.layers)
    return SandboxRow(**values)


def _snapshot_row(model: SnapshotModel) -> SnapshotRow:
    return SnapshotRow(
        snapshot_id=model.snapshot_id,
        team_id=model.team_id,
        sandbox_id=model.sandbox_id,
        name=model.name,
        layer=model.layer,
        created_at=model.created_at,
    )


_METRIC_FIELDS = ("cpu_count", "cpu_used_pct", "mem_used", "mem_total", "mem_cache", "disk_used", "disk_total")
_LOG_LEVELS = ("debug", "info", "warn", "error")


def encode_snapshot_cursor(created_at: datetime, snapshot_id: str) -> str:
    raw = f"{created_at.astimezone(UTC).isoformat()}__{snapshot_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_snapshot_cursor(token: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        stamp, _, snapshot_id = raw.partition("__")
        created_at = datetime.fromisoformat(stamp)
        if not snapshot_id or created_at.tzinfo is None:
            raise ValueError(raw)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument(f"invalid nextToken {token!r}") from None
    return created_at.astimezone(UTC), snapshot_id


def _column_values(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Row field names and values -> ORM attribute names and storable values."""
    values: dict[str, Any] = {}
    for name, value in fields.items():
        if name == "state":
            value = SandboxState(value).value
        elif name in ("metadata", "env_vars"):
            value = dict(value or {})
        elif name == "layers":
            value = None if value is None else list(value)
        values["metadata_" if name == "metadata" else name] = value
    return values


def _states(states: SandboxState | Collection[SandboxState]) -> list[str]:
    if isinstance(states, SandboxState):
        return [states.value]
    return [SandboxState(state).value for state in states]


def _after(cursor: Cursor) -> ColumnElement[bool]:
    """Keyset predicate: rows strictly after `cursor` in the cursor's direction."""
    started, key = SandboxModel.started_at, SandboxModel.sandbox_id
    if cursor.order is Order.DESC:
        return or_(started < cursor.started_at, and_(started == cursor.started_at, key < cursor.sandbox_id))
    return or_(started > cursor.started_at, and_(started == cursor.started_at, key > cursor.sandbox_id))


def _write_secret(path: Path, text: str) -> None:
    """Replace `path` with `text`, readable by the owner only, never visible half-written."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _read_secret(path: Path) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError):
        return None
    with os.fdopen(fd, encoding="utf-8") as handle:
        return handle.read().strip() or None


class Store:
    """Teams, API keys and sandboxes, in one SQL database (SQLite file by default).

    `Store(settings)` connects lazily to `settings.db_url`; `migrate()` (or `Store.open`) creates the
    state dir and brings the schema to head before first use.
    """

    def __init__(self, settings: Settings) -> None:
        self._setup(create_engine(settings.db_url), key_file=settings.home / "api_key", home=settings.home)

    @classmethod
    def from_engine(cls, engine: Engine, *, key_file: Path | None = None) -> Store:
        """A store on any engine; `key_file` is where a generated default API key is kept."""
        store = cls.__new__(cls)
        store._setup(engine, key_file=key_file, home=None)
        return store

    @classmethod
    def open(cls, settings: Settings) -> Store:
        """`Store(settings)`, migrated and ready."""
        store = cls(settings)
        store.migrate()
        return store

    def _setup(self, engine: Engine, *, key_file: Path | None, home: Path | None) -> None:
        self._engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._key_file = key_file
        self._home = home

    def migrate(self) -> None:
        """Create the state dir (0700) and the SQLite file (0600) if missing; migrate the schema to head.

        SQLite gives the -wal and -shm files the database file's mode, so the envd access tokens
        in them stay private too.
        """
        if self._home is not None:
            self._home.mkdir(parents=True, exist_ok=True, mode=0o700)
        database = self._engine.url.database
        if self._engine.url.get_backend_name() == "sqlite" and database and database != ":memory:":
            with contextlib.suppress(FileExistsError):
                os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        migrate(self._engine)

    @property
    def engine(self) -> Engine:
        return self._engine

    def close(self) -> None:
        self._engine.dispose()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    # -- teams and API keys ------------------------------------------------------------------------

    def ensure_default_team(self, api_key: str | None) -> str:
        """Make sure team "default" exists and has a key; return the plaintext key to show.

        * `api_key` given (CORRAL_API_KEY): it is registered for the default team if it is not yet.
        * otherwise the key kept in `key_file` is used (and registered again if the database lost it);
        * otherwise a new key is generated, registered and written to `key_file` (0600).
        """
        with self._transaction() as session:
            team_id = self._default_team(session)
            if api_key:
                self._register_key(session, team_id, api_key)
                return api_key
            stored = _read_secret(self._key_file) if self._key_file is not None else None
            if stored:
                self._register_key(session, team_id, stored)
                return stored
            key = new_api_key()
            self._register_key(session, team_id, key)
            if self._key_file is not None:
                # Written before the commit: if it cannot be written, the key is not registered either.
                _write_secret(self._key_file, key)
            return key

    def default_team_id(self) -> str | None:
        with self._sessions() as session:
            return session.scalar(select(TeamModel.id).where(TeamModel.name == DEFAULT_TEAM))

    def team_for_api_key(self, key: str) -> str | None:
        """The team `key` belongs to, or None. Looked up by hash; the plaintext is never stored."""
        if not key:
            return None
        digest = hash_api_key(key)
        with self._sessions() as session:
            found = session.execute(
                select(ApiKeyModel.key_hash, ApiKeyModel.team_id).where(ApiKeyModel.key_hash == digest)
            ).first()
        if found is None or not hmac.compare_digest(found.key_hash, digest):
            return None
        return str(found.team_id)

    def create_team(self, name: str) -> tuple[str, str]:
        """A new team and its first API key: `(team id, plaintext key)`. The key is shown once:
        only its hash is kept. AlreadyExists when the name is taken."""
        name = validate_team_name(name)
        key = new_api_key()
        try:
            with self._transaction() as session:
                team_id = str(uuid.uuid4())
                session.add(TeamModel(id=team_id, name=name, created_at=_now()))
                session.flush()
                self._register_key(session, team_id, key)
        except IntegrityError:
            raise AlreadyExists(f"team '{name}' already exists") from None
        return team_id, key

    def add_api_key(self, team_name: str) -> str:
        """A new API key for an existing team (its other keys keep working); the plaintext key,
        shown once. NotFound when there is no such team."""
        key = new_api_key()
        with self._transaction() as session:
            team_id = session.scalar(select(TeamModel.id).where(TeamModel.name == team_name))
            if team_id is None:
                raise NotFound(f"team '{team_name}' not found")
            self._register_key(session, team_id, key)
        return key

    def list_teams(self) -> list[tuple[str, str, int]]:
        """Every team as `(name, id, number of API keys)`, by name."""
        with self._sessions() as session:
            rows = session.execute(
                select(TeamModel.name, TeamModel.id, func.count(ApiKeyModel.id))
                .outerjoin(ApiKeyModel, ApiKeyModel.team_id == TeamModel.id)
                .group_by(TeamModel.id)
                .order_by(TeamModel.name)
            ).all()
        return [(str(name), str(team_id), int(keys)) for name, team_id, keys in rows]

    @staticmethod
    def _default_team(session: Session) -> str:
        team_id = session.scalar(select(TeamModel.id).where(TeamModel.name == DEFAULT_TEAM))
        if team_id is None:
            team_id = str(uuid.uuid4())
            session.add(TeamModel(id=team_id, name=DEFAULT_TEAM, created_at=_now()))
            session.flush()
        return team_id

    @staticmethod
    def _register_key(session: Session, team_id: str, key: str) -> None:
        digest = hash_api_key(key)
        if session.scalar(select(ApiKeyModel.id).where(ApiKeyModel.key_hash == digest)) is None:
            session.add(
                ApiKeyModel(
                    id=str(uuid.uuid4()),
                    team_id=team_id,
                    key_hash=digest,
                    key_prefix=key[:8],
                    created_at=_now(),
                )
            )
            session.flush()

    # -- sandboxes ---------------------------------------------------------------------------------

    def insert_sandbox(self, row: SandboxRow) -> None:
        """Record a new sandbox. `AlreadyExists` if the id is taken (also by a killed one)."""
        values = _column_values({name: getattr(row, name) for name in SANDBOX_COLUMNS})
        try:
            with self._transaction() as session:
                session.add(SandboxModel(**values))
        except IntegrityError:
            if self.get_sandbox(row.sandbox_id, include_killed=True) is not None:
                raise AlreadyExists(f'sandbox "{row.sandbox_id}" already exists') from None
            raise

    def get_sandbox(
        self, sandbox_id: str, team_id: str | None = None, *, include_killed: bool = False
    ) -> SandboxRow | None:
        """The sandbox, if it exists (and belongs to `team_id` when given). Killed ones only on request."""
        statement = select(SandboxModel).where(SandboxModel.sandbox_id == sandbox_id)
        if team_id is not None:
            statement = statement.where(SandboxModel.team_id == team_id)
        if not include_killed:
            statement = statement.where(SandboxModel.state != SandboxState.KILLED.value)
        with self._sessions() as session:
            model = session.scalar(statement)
            return None if model is None else _to_row(model)

    def update_sandbox(
        self,
        sandbox_id: str,
        *,
        expect_state: SandboxState | Collection[SandboxState] | None = None,
        **fields: Any,
    ) -> SandboxRow | None:
        """Set `fields` on a sandbox that is not killed; return the updated row.

        With `expect_state`, the update only happens while the sandbox is in (one of) those states:
        a compare-and-set for state transitions. Returns None when nothing matched (unknown, killed,
        or not in the expected state). Killing goes through `mark_killed`.
        """
        unknown = set(fields) - UPDATABLE_COLUMNS
        if unknown:
            raise TypeError(f"not updatable sandbox fields: {sorted(unknown)}")
        if "state" in fields and SandboxState(fields["state"]) is SandboxState.KILLED:
            raise ValueError("use Store.mark_killed to kill a sandbox")
        where = [SandboxModel.sandbox_id == sandbox_id, SandboxModel.state != SandboxState.KILLED.value]
        if expect_state is not None:
            where.append(SandboxModel.state.in_(_states(expect_state)))
        with self._transaction() as session:
            if fields:
                result = session.execute(
                    update(SandboxModel)
                    .where(*where)
                    .values(**_column_values(fields))
                    .execution_options(synchronize_session=False)
                )
                if result.rowcount == 0:  # type: ignore[attr-defined]
                    return None
                where = where[:1]  # the state may have just changed: read the row back by its key
            model = session.scalar(select(SandboxModel).where(*where))
            return None if model is None else _to_row(model)

    def mark_killed(self, sandbox_id: str, reason: str, *, now: datetime | None = None) -> SandboxRow | None:
        """Move a live sandbox to `killed`; return its final row, or None if it was unknown or already killed.

        Exactly one of several concurrent callers gets the row: use that to decide who cleans up.
        """
        killed_at = now or _now()
        live = [SandboxModel.sandbox_id == sandbox_id, SandboxModel.state != SandboxState.KILLED.value]
        with self._transaction() as session:
            result = session.execute(
                update(SandboxModel)
                .where(*live)
                .values(state=SandboxState.KILLED.value, killed_at=killed_at, kill_reason=reason)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount == 0:  # type: ignore[attr-defined]
                return None
            model = session.scalar(select(SandboxModel).where(SandboxModel.sandbox_id == sandbox_id))
            return None if model is None else _to_row(model)

    def list_sandboxes(self, team_id: str, query: SandboxQuery) -> tuple[list[SandboxRow], str | None]:
        """One page of the team's sandboxes for `query` (see `corral.server.query`), and the next token."""
        statement = select(SandboxModel).where(
            SandboxModel.team_id == team_id, SandboxModel.state.in_(_states(query.states))
        )
        if query.started_after is not None:
            statement = statement.where(SandboxModel.started_at >= query.started_after)
        if query.template is not None:
            statement = statement.where(
                or_(SandboxModel.template_id == query.template, SandboxModel.alias == query.template)
            )
        if query.order is Order.DESC:
            statement = statement.order_by(SandboxModel.started_at.desc(), SandboxModel.sandbox_id.desc())
        else:
            statement = statement.order_by(SandboxModel.started_at.asc(), SandboxModel.sandbox_id.asc())

        # Metadata is matched here rather than in SQL: JSON path syntax differs per backend and mangles
        # keys with quotes or dots. Without a metadata filter this is a single query of limit + 1 rows.
        wanted = query.limit + 1
        batch = wanted if not query.metadata else max(wanted, _SCAN_BATCH)
        found: list[SandboxRow] = []
        cursor = query.cursor
        with self._sessions() as session:
            while len(found) < wanted:
                page = statement if cursor is None else statement.where(_after(cursor))
                models = session.scalars(page.limit(batch)).all()
                for model in models:
                    if metadata_matches(model.metadata_, query.metadata):
                        found.append(_to_row(model))
                if len(models) < batch:
                    break
                cursor = Cursor(models[-1].started_at, models[-1].sandbox_id, query.order)
        rows = found[: query.limit]
        if len(found) <= query.limit:
            return rows, None
        return rows, encode_cursor(rows[-1].started_at, rows[-1].sandbox_id, query.order)

    def live_sandboxes(self) -> list[SandboxRow]:
        """Every sandbox of every team that is creating, running or paused (for reconciliation)."""
        statement = (
            select(SandboxModel)
            .where(SandboxModel.state.in_(_states(LIVE_STATES)))
            .order_by(SandboxModel.started_at, SandboxModel.sandbox_id)
        )
        with self._sessions() as session:
            return [_to_row(model) for model in session.scalars(statement)]

    def expired(self, now: datetime) -> list[SandboxRow]:
        """Running sandboxes whose `end_at` is at or before `now`, soonest first."""
        statement = (
            select(SandboxModel)
            .where(SandboxModel.state == SandboxState.RUNNING.value, SandboxModel.end_at <= now)
            .order_by(SandboxModel.end_at, SandboxModel.sandbox_id)
        )
        with self._sessions() as session:
            return [_to_row(model) for model in session.scalars(statement)]

    def purge_killed(self, before: datetime) -> int:
        """Delete rows of sandboxes killed before `before`; returns how many went."""
        with self._transaction() as session:
            result = session.execute(
                delete(SandboxModel)
                .where(SandboxModel.state == SandboxState.KILLED.value, SandboxModel.killed_at < before)
                .execution_options(synchronize_session=False)
            )
            return int(result.rowcount)  # type: ignore[attr-defined]

    # -- snapshots ---------------------------------------------------------------------------------

    def insert_snapshot(self, row: SnapshotRow) -> None:
        with self._transaction() as session:
            session.add(SnapshotModel(**{f: getattr(row, f) for f in SnapshotRow.__dataclass_fields__}))

    def get_snapshot(self, snapshot_id: str, team_id: str | None = None) -> SnapshotRow | None:
        statement = select(SnapshotModel).where(SnapshotModel.snapshot_id == snapshot_id)
        if team_id is not None:
            statement = statement.where(SnapshotModel.team_id == team_id)
        with self._sessions() as session:
            model = session.scalar(statement)
            return None if model is None else _snapshot_row(model)

    def snapshot_by_name(self, team_id: str, name: str) -> SnapshotRow | None:
        statement = select(SnapshotModel).where(SnapshotModel.team_id == team_id, SnapshotModel.name == name)
        with self._sessions() as session:
            model = session.scalar(statement)
            return None if model is None else _snapshot_row(model)

    def update_snapshot(self, snapshot_id: str, *, sandbox_id: str, layer: str, created_at: datetime) -> None:
        with self._transaction() as session:
            session.execute(
                update(SnapshotModel)
                .where(SnapshotModel.snapshot_id == snapshot_id)
                .values(sandbox_id=sandbox_id, layer=layer, created_at=created_at)
                .execution_options(synchronize_session=False)
            )

    def delete_snapshot(self, snapshot_id: str, team_id: str) -> SnapshotRow | None:
        """Remove a snapshot's record; returns it, or None when there was none (of this team)."""
        with self._transaction() as session:
            model = session.scalar(
                select(SnapshotModel).where(SnapshotModel.snapshot_id == snapshot_id, SnapshotModel.team_id == team_id)
            )
            if model is None:
                return None
            row = _snapshot_row(model)
            session.delete(model)
            return row

    def list_snapshots(
        self,
        team_id: str,
        *,
        sandbox_id: str | None = None,
        names: Collection[str] = (),
        limit: int = 100,
        next_token: str | None = None,
    ) -> tuple[list[SnapshotRow], str | None]:
        """One page of the team's snapshots, newest first; `names` matches a snapshot's id or name."""
        statement = select(SnapshotModel).where(SnapshotModel.team_id == team_id)
        if sandbox_id is not None:
            statement = statement.where(SnapshotModel.sandbox_id == sandbox_id)
        if names:
            statement = statement.where(or_(SnapshotModel.snapshot_id.in_(names), SnapshotModel.name.in_(names)))
        if next_token:
            created, key = decode_snapshot_cursor(next_token)
            statement = statement.where(
                or_(
                    SnapshotModel.created_at < created,
                    and_(SnapshotModel.created_at == created, SnapshotModel.snapshot_id < key),
                )
            )
        statement = statement.order_by(SnapshotModel.created_at.desc(), SnapshotModel.snapshot_id.desc())
        with self._sessions() as session:
            rows = [_snapshot_row(m) for m in session.scalars(statement.limit(limit + 1))]
        if len(rows) <= limit:
            return rows, None
        rows = rows[:limit]
        return rows, encode_snapshot_cursor(rows[-1].created_at, rows[-1].snapshot_id)

    # -- layers the lifecycle made -----------------------------------------------------------------

    def add_owned_layer(self, digest: str, kind: str) -> None:
        """Record that a snapshot, fork, build step or registry pull made layer `digest` (idempotent);
        "adopted": an older version's layer nothing refers to (`corral.server.layer_adoption`)."""
        with self._transaction() as session:
            if session.get(OwnedLayerModel, digest) is None:
                session.add(OwnedLayerModel(digest=digest, kind=kind, created_at=_now()))

    def owned_layers(self) -> list[str]:
        with self._sessions() as session:
            return list(session.scalars(select(OwnedLayerModel.digest).order_by(OwnedLayerModel.created_at)))

    def owned_layer_sizes(self) -> dict[str, int | None]:
        """Every owned layer's disk usage in bytes; None for one not measured yet."""
        with self._sessions() as session:
            rows = session.execute(select(OwnedLayerModel.digest, OwnedLayerModel.size_bytes))
            return {digest: size for digest, size in rows}

    def set_owned_layer_size(self, digest: str, size_bytes: int) -> None:
        """Remember an owned layer's measured size (layers never change); no-op if it is not owned."""
        with self._transaction() as session:
            session.execute(
                update(OwnedLayerModel).where(OwnedLayerModel.digest == digest).values(size_bytes=size_bytes)
            )

    def remove_owned_layer(self, digest: str) -> None:
        with self._transaction() as session:
            session.execute(delete(OwnedLayerModel).where(OwnedLayerModel.digest == digest))

    def layers_in_use(self) -> set[str]:
        """Layer digests that live sandboxes are made of, or that snapshots added."""
        live = select(SandboxModel.layers).where(SandboxModel.state.in_(_states(LIVE_STATES)))
        with self._sessions() as session:
            used = {digest for layers in session.scalars(live) for digest in (layers or ())}
            used.update(session.scalars(select(SnapshotModel.layer)))
        return used

    # -- metrics -----------------------------------------------------------------------------------

    def add_metrics(self, rows: Collection[MetricRow]) -> None:
        """Record samples (of sandboxes that still exist: samples of a vanished one are dropped)."""
        if not rows:
            return
        with self._transaction() as session:
            known = set(
                session.scalars(
                    select(SandboxModel.sandbox_id).where(
                        SandboxModel.sandbox_id.in_({r.sandbox_id for r in rows}),
                        SandboxModel.state != SandboxState.KILLED.value,
                    )
                )
            )
            session.add_all(
                SandboxMetricModel(sandbox_id=r.sandbox_id, ts=r.ts, **{f: getattr(r, f) for f in _METRIC_FIELDS})
                for r in rows
                if r.sandbox_id in known
            )

    def metrics(self, sandbox_id: str, start: datetime | None = None, end: datetime | None = None) -> list[MetricRow]:
        """A sandbox's samples with `start <= ts <= end`, oldest first."""
        statement = select(SandboxMetricModel).where(SandboxMetricModel.sandbox_id == sandbox_id)
        if start is not None:
            statement = statement.where(SandboxMetricModel.ts >= start)
        if end is not None:
            statement = statement.where(SandboxMetricModel.ts <= end)
        statement = statement.order_by(SandboxMetricModel.ts, SandboxMetricModel.id)
        with self._sessions() as session:
            return [
                MetricRow(sandbox_id=m.sandbox_id, ts=m.ts, **{f: getattr(m, f) for f in _METRIC_FIELDS})
                for m in session.scalars(statement)
            ]

    # -- logs --------------------------------------------------------------------------------------

    def add_log(self, sandbox_id: str, level: str, message: str, *, ts: datetime | None = None) -> None:
        if level not in _LOG_LEVELS:
            raise ValueError(f"unknown log level {level!r}")
        with self._transaction() as session:
            session.add(SandboxLogModel(sandbox_id=sandbox_id, ts=ts or _now(), level=level, message=message))

    def logs(
        self,
        sandbox_id: str,
        *,
        start: datetime | None = None,
        limit: int = 1000,
        forward: bool = True,
        min_level: str | None = None,
        search: str | None = None,
    ) -> list[LogRow]:
        """Log lines from `start` on (forward, oldest first) or up to it (backward, newest first)."""
        statement = select(SandboxLogModel).where(SandboxLogModel.sandbox_id == sandbox_id)
        if start is not None:
            statement = statement.where(SandboxLogModel.ts >= start if forward else SandboxLogModel.ts <= start)
        if min_level is not None:
            if min_level not in _LOG_LEVELS:
                raise InvalidArgument(f"invalid level {min_level!r}: expected one of {', '.join(_LOG_LEVELS)}")
            statement = statement.where(SandboxLogModel.level.in_(_LOG_LEVELS[_LOG_LEVELS.index(min_level) :]))
        if search:
            statement = statement.where(SandboxLogModel.message.contains(search, autoescape=True))
        if forward:
            statement = statement.order_by(SandboxLogModel.ts, SandboxLogModel.id)
        else:
            statement = statement.order_by(SandboxLogModel.ts.desc(), SandboxLogModel.id.desc())
        with self._sessions() as session:
            return [
                LogRow(sandbox_id=m.sandbox_id, ts=m.ts, level=m.level, message=m.message)
                for m in session.scalars(statement.limit(limit))
            ]

    def purge_sandbox_data(self, sandbox_id: str) -> None:
        """Drop a sandbox's metrics and logs (when it is killed)."""
        with self._transaction() as session:
            session.execute(delete(SandboxMetricModel).where(SandboxMetricModel.sandbox_id == sandbox_id))
            session.execute(delete(SandboxLogModel).where(SandboxLogModel.sandbox_id == sandbox_id))

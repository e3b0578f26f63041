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

import contextlib
import hashlib
import hmac
import os
import uuid
from collections.abc import Collection, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, Engine, and_, delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from corral.core.errors import AlreadyExists
from corral.core.ids import new_api_key
from corral.core.sandbox import SandboxState
from corral.core.settings import Settings
from corral.server.query import Cursor, Order, SandboxQuery, encode_cursor, metadata_matches
from corral.server.store._engine import create_engine
from corral.server.store._migrate import migrate
from corral.server.store._models import ApiKeyModel, SandboxModel, TeamModel
from corral.server.store._rows import SANDBOX_COLUMNS, UPDATABLE_COLUMNS, SandboxRow

__all__ = ["DEFAULT_TEAM", "LIVE_STATES", "Store", "hash_api_key"]

DEFAULT_TEAM = "default"
LIVE_STATES: frozenset[SandboxState] = frozenset(
    {SandboxState.CREATING, SandboxState.RUNNING, SandboxState.PAUSED}
)
# Rows fetched per round trip while a metadata filter (applied in Python, see `list_sandboxes`) drops some.
_SCAN_BATCH = 256


def hash_api_key(key: str) -> str:
    """What the database keeps instead of a key: sha256, hex."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


def _to_row(model: SandboxModel) -> SandboxRow:
    values = {name: getattr(model, name) for name in SANDBOX_COLUMNS if name != "metadata"}
    values["state"] = SandboxState(model.state)
    values["metadata"] = dict(model.metadata_ or {})
    values["env_vars"] = dict(model.env_vars or {})
    return SandboxRow(**values)


def _column_values(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Row field names and values -> ORM attribute names and storable values."""
    values: dict[str, Any] = {}
    for name, value in fields.items():
        if name == "state":
            value = SandboxState(value).value
        elif name in ("metadata", "env_vars"):
            value = dict(value or {})
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

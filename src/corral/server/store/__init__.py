"""State store of the control plane: SQLAlchemy over a SQLite file (WAL) or PostgreSQL.

    store = Store(settings)       # lazy: nothing touches the disk yet
    store.migrate()               # mkdir $CORRAL_HOME (0700), create corral.db (0600), schema to head
    key = store.ensure_default_team(settings.api_key)

`Store` methods are synchronous, short and thread-safe (see `_store.py` for calling them from async
code). Rows come out as frozen `SandboxRow` values, never ORM objects. The schema is owned by the
alembic migrations in `migrations/`, applied by `Store.migrate()` (or `migrate(engine)` for an engine of your own).
"""

from corral.server.store._engine import create_engine
from corral.server.store._migrate import current_revision, head_revision, migrate
from corral.server.store._rows import LogRow, MetricRow, SandboxRow, SnapshotRow
from corral.server.store._store import DEFAULT_TEAM, LIVE_STATES, Store, hash_api_key

__all__ = [
    "DEFAULT_TEAM",
    "LIVE_STATES",
    "LogRow",
    "MetricRow",
    "SandboxRow",
    "SnapshotRow",
    "Store",
    "create_engine",
    "current_revision",
    "hash_api_key",
    "head_revision",
    "migrate",
]

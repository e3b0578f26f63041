"""Engine construction: one place that knows what each database backend needs on connect."""

from __future__ import annotations

from typing import Any

import sqlalchemy
from sqlalchemy import Engine, event

__all__ = ["SQLITE_BUSY_TIMEOUT_MS", "create_engine"]

# How long a SQLite writer waits for the write lock before failing with "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 5000


def _configure_sqlite_connection(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers run while one writer writes; it is a property of the file and sticks, but
    # setting it on every connect is cheap and covers new files. synchronous=NORMAL (no fsync per
    # commit; about 2 ms saved on each write here) survives a crash of the server process with
    # nothing lost; only a power loss or kernel crash can drop the last commits, and that also ends
    # every sandbox they describe, which reconciliation at start-up then marks killed.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def create_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for `url` (`settings.db_url`): SQLite in WAL mode, or any SQLAlchemy URL."""
    parsed = sqlalchemy.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        connect_args = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
        connect_args.update(kwargs.pop("connect_args", {}))
        engine = sqlalchemy.create_engine(parsed, connect_args=connect_args, **kwargs)
        event.listen(engine, "connect", _configure_sqlite_connection)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return sqlalchemy.create_engine(parsed, **kwargs)

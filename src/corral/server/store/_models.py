"""ORM tables of the state store. Portable SQL only: they run on SQLite and on PostgreSQL.

The schema itself is created by the alembic migrations next to this module (`migrations/`), not by
`metadata.create_all`; `tests/unit/test_store.py` checks that the two agree.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Dialect, ForeignKey, Index, Integer, MetaData, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

__all__ = ["ApiKeyModel", "Base", "SandboxModel", "TeamModel", "UTCDateTime"]

# Deterministic constraint names, so later migrations can address them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp with microseconds, whatever the backend keeps.

    PostgreSQL's `timestamptz` keeps the instant; SQLite stores text and drops the offset. So aware
    values are converted to UTC before binding (naive ones are refused: they are a bug), and values
    read back are marked UTC. On SQLite the stored text is fixed-width, so ordering and comparing
    it in SQL orders the instants.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: the store only takes timezone-aware timestamps")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class TeamModel(Base):
    __tablename__ = "teams"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ApiKeyModel(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    team_id: Mapped[str] = mapped_column(String(36), ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the plaintext key
    key_prefix: Mapped[str] = mapped_column(String(16))  # shown to people to tell keys apart
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class SandboxModel(Base):
    __tablename__ = "sandboxes"
    __table_args__ = (
        Index("ix_sandboxes_team_id_state_started_at", "team_id", "state", "started_at"),
        Index("ix_sandboxes_state_end_at", "state", "end_at"),
    )

    sandbox_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    team_id: Mapped[str] = mapped_column(String(36), ForeignKey("teams.id", ondelete="CASCADE"))
    template_id: Mapped[str] = mapped_column(String(255))
    alias: Mapped[str | None] = mapped_column(String(255))
    client_id: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))  # corral.core.sandbox.SandboxState value
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    end_at: Mapped[datetime] = mapped_column(UTCDateTime())
    cpu_count: Mapped[int] = mapped_column(Integer)
    memory_mb: Mapped[int] = mapped_column(Integer)
    disk_size_mb: Mapped[int] = mapped_column(Integer)
    envd_access_token: Mapped[str | None] = mapped_column(String(128))
    envd_version: Mapped[str] = mapped_column(String(32))
    # `metadata` is taken by DeclarativeBase, hence the trailing underscore on the attribute only.
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON)
    env_vars: Mapped[dict[str, Any]] = mapped_column(JSON)
    allow_internet_access: Mapped[bool] = mapped_column(Boolean)
    secure: Mapped[bool] = mapped_column(Boolean)
    auto_pause: Mapped[bool] = mapped_column(Boolean)
    ip: Mapped[str | None] = mapped_column(String(45))
    node_id: Mapped[str | None] = mapped_column(String(64))
    killed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    kill_reason: Mapped[str | None] = mapped_column(Text)

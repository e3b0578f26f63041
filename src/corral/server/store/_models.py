"""ORM tables of the state store. Portable SQL only: they run on SQLite and on PostgreSQL.

The schema itself is created by the alembic migrations next to this module (`migrations/`), not by
`metadata.create_all`; `tests/unit/test_store.py` checks that the two agree.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

__all__ = [
    "ApiKeyModel",
    "Base",
    "OwnedLayerModel",
    "SandboxLogModel",
    "SandboxMetricModel",
    "SandboxModel",
    "SandboxNetworkModel",
    "SnapshotModel",
    "TeamModel",
    "UTCDateTime",
]

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
    # 0002: lifecycle
    auto_pause_memory: Mapped[bool] = mapped_column(Boolean, server_default="1")
    auto_resume: Mapped[bool] = mapped_column(Boolean, server_default="0")
    timeout_s: Mapped[int] = mapped_column(Integer, server_default="300")
    paused_memory: Mapped[bool | None] = mapped_column(Boolean)  # while paused: frozen (True) / stopped (False)
    layers: Mapped[list[str] | None] = mapped_column(JSON)  # layer digests, lowest first


class SnapshotModel(Base):
    """A snapshot of a sandbox's files, usable as a template (its id is the template id)."""

    __tablename__ = "snapshots"
    __table_args__ = (Index("ix_snapshots_team_id_created_at", "team_id", "created_at"),)

    snapshot_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    team_id: Mapped[str] = mapped_column(String(36), ForeignKey("teams.id", ondelete="CASCADE"))
    sandbox_id: Mapped[str] = mapped_column(String(64), index=True)  # the sandbox it was taken of
    name: Mapped[str | None] = mapped_column(String(255))
    layer: Mapped[str] = mapped_column(String(64))  # digest of the layer the snapshot added
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class OwnedLayerModel(Base):
    """A layer made to be disposable (snapshot, fork, build step, registry pull), or an older
    version's layer nothing refers to (adopted at start); removed once unused. 0004: its size."""

    __tablename__ = "owned_layers"

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # "snapshot" | "fork" | "build" | "pull" | "adopted"
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)  # disk usage; None until measured


class SandboxMetricModel(Base):
    __tablename__ = "sandbox_metrics"
    __table_args__ = (Index("ix_sandbox_metrics_sandbox_id_ts", "sandbox_id", "ts"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sandbox_id: Mapped[str] = mapped_column(String(64), ForeignKey("sandboxes.sandbox_id", ondelete="CASCADE"))
    ts: Mapped[datetime] = mapped_column(UTCDateTime())
    cpu_count: Mapped[int] = mapped_column(Integer)
    cpu_used_pct: Mapped[float] = mapped_column(Float)
    mem_used: Mapped[int] = mapped_column(BigInteger)
    mem_total: Mapped[int] = mapped_column(BigInteger)
    mem_cache: Mapped[int] = mapped_column(BigInteger)
    disk_used: Mapped[int] = mapped_column(BigInteger)
    disk_total: Mapped[int] = mapped_column(BigInteger)


class SandboxLogModel(Base):
    __tablename__ = "sandbox_logs"
    __table_args__ = (Index("ix_sandbox_logs_sandbox_id_ts", "sandbox_id", "ts"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sandbox_id: Mapped[str] = mapped_column(String(64), ForeignKey("sandboxes.sandbox_id", ondelete="CASCADE"))
    ts: Mapped[datetime] = mapped_column(UTCDateTime())
    level: Mapped[str] = mapped_column(String(8))  # debug | info | warn | error
    message: Mapped[str] = mapped_column(Text)


class SandboxNetworkModel(Base):
    """0003: a sandbox's E2B `network` config (as the API reports it) and its traffic access token;
    written by `corral.server.network_policy`."""

    __tablename__ = "sandbox_networks"

    sandbox_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("sandboxes.sandbox_id", ondelete="CASCADE"), primary_key=True
    )
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    traffic_access_token: Mapped[str | None] = mapped_column(String(128))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

"""Lifecycle and resources: pause/resume settings on sandboxes, snapshots, owned layers, metrics, logs.

Revision ID: 0002
Revises: 0001
Create Date: 2025-11-26

Self-contained on purpose (no imports from the models): a migration describes the schema as it was
when it was written, whatever the models say later.

sandboxes gains:
  auto_pause_memory  on timeout-pause, keep memory (freeze) or only files (stop)
  auto_resume        traffic to a paused (frozen) sandbox resumes it
  timeout_s          the sandbox's timeout in seconds (what an auto-resume gives it again)
  paused_memory      while paused: true = frozen (memory kept), false = stopped (files only)
  layers             the layer digests its root filesystem is made of, lowest first (forks and
                     snapshots make sandboxes whose layers no template lists)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _timestamp(name: str, nullable: bool = False) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    with op.batch_alter_table("sandboxes") as batch:
        batch.add_column(
            sa.Column("auto_pause_memory", sa.Boolean(), nullable=False, server_default=sa.true())
        )
        batch.add_column(sa.Column("auto_resume", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("timeout_s", sa.Integer(), nullable=False, server_default="300"))
        batch.add_column(sa.Column("paused_memory", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("layers", sa.JSON(), nullable=True))
    op.create_table(
        "snapshots",
        sa.Column("snapshot_id", sa.String(64), nullable=False),
        sa.Column("team_id", sa.String(36), nullable=False),
        sa.Column("sandbox_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(255), nullable=True),
        sa.Column("layer", sa.String(64), nullable=False),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("snapshot_id", name="pk_snapshots"),
        sa.ForeignKeyConstraint(
            ["team_id"], ["teams.id"], name="fk_snapshots_team_id_teams", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_snapshots_team_id_created_at", "snapshots", ["team_id", "created_at"])
    op.create_index("ix_snapshots_sandbox_id", "snapshots", ["sandbox_id"])
    op.create_table(
        "owned_layers",
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("digest", name="pk_owned_layers"),
    )
    op.create_table(
        "sandbox_metrics",
        sa.Column("id", sa.Integer(), nullable=False, autoincrement=True),
        sa.Column("sandbox_id", sa.String(64), nullable=False),
        _timestamp("ts"),
        sa.Column("cpu_count", sa.Integer(), nullable=False),
        sa.Column("cpu_used_pct", sa.Float(), nullable=False),
        sa.Column("mem_used", sa.BigInteger(), nullable=False),
        sa.Column("mem_total", sa.BigInteger(), nullable=False),
        sa.Column("mem_cache", sa.BigInteger(), nullable=False),
        sa.Column("disk_used", sa.BigInteger(), nullable=False),
        sa.Column("disk_total", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_sandbox_metrics"),
        sa.ForeignKeyConstraint(
            ["sandbox_id"],
            ["sandboxes.sandbox_id"],
            name="fk_sandbox_metrics_sandbox_id_sandboxes",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_sandbox_metrics_sandbox_id_ts", "sandbox_metrics", ["sandbox_id", "ts"])
    op.create_table(
        "sandbox_logs",
        sa.Column("id", sa.Integer(), nullable=False, autoincrement=True),
        sa.Column("sandbox_id", sa.String(64), nullable=False),
        _timestamp("ts"),
        sa.Column("level", sa.String(8), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_sandbox_logs"),
        sa.ForeignKeyConstraint(
            ["sandbox_id"],
            ["sandboxes.sandbox_id"],
            name="fk_sandbox_logs_sandbox_id_sandboxes",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_sandbox_logs_sandbox_id_ts", "sandbox_logs", ["sandbox_id", "ts"])


def downgrade() -> None:
    op.drop_index("ix_sandbox_logs_sandbox_id_ts", table_name="sandbox_logs")
    op.drop_table("sandbox_logs")
    op.drop_index("ix_sandbox_metrics_sandbox_id_ts", table_name="sandbox_metrics")
    op.drop_table("sandbox_metrics")
    op.drop_table("owned_layers")
    op.drop_index("ix_snapshots_sandbox_id", table_name="snapshots")
    op.drop_index("ix_snapshots_team_id_created_at", table_name="snapshots")
    op.drop_table("snapshots")
    with op.batch_alter_table("sandboxes") as batch:
        for name in ("layers", "paused_memory", "timeout_s", "auto_resume", "auto_pause_memory"):
            batch.drop_column(name)

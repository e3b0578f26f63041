"""Initial schema: teams, api_keys, sandboxes.

Revision ID: 0001
Revises:
Create Date: 2025-11-26

Self-contained on purpose (no imports from the models): a migration describes the schema as it was
when it was written, whatever the models say later.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _timestamp(name: str, nullable: bool = False) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "teams",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_teams"),
        sa.UniqueConstraint("name", name="uq_teams_name"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("team_id", sa.String(36), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("key_prefix", sa.String(16), nullable=False),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.ForeignKeyConstraint(
            ["team_id"], ["teams.id"], name="fk_api_keys_team_id_teams", ondelete="CASCADE"
        ),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
    )
    op.create_index("ix_api_keys_team_id", "api_keys", ["team_id"])
    op.create_table(
        "sandboxes",
        sa.Column("sandbox_id", sa.String(64), nullable=False),
        sa.Column("team_id", sa.String(36), nullable=False),
        sa.Column("template_id", sa.String(255), nullable=False),
        sa.Column("alias", sa.String(255), nullable=True),
        sa.Column("client_id", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        _timestamp("started_at"),
        _timestamp("end_at"),
        sa.Column("cpu_count", sa.Integer(), nullable=False),
        sa.Column("memory_mb", sa.Integer(), nullable=False),
        sa.Column("disk_size_mb", sa.Integer(), nullable=False),
        sa.Column("envd_access_token", sa.String(128), nullable=True),
        sa.Column("envd_version", sa.String(32), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("env_vars", sa.JSON(), nullable=False),
        sa.Column("allow_internet_access", sa.Boolean(), nullable=False),
        sa.Column("secure", sa.Boolean(), nullable=False),
        sa.Column("auto_pause", sa.Boolean(), nullable=False),
        sa.Column("ip", sa.String(45), nullable=True),
        sa.Column("node_id", sa.String(64), nullable=True),
        _timestamp("killed_at", nullable=True),
        sa.Column("kill_reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("sandbox_id", name="pk_sandboxes"),
        sa.ForeignKeyConstraint(
            ["team_id"], ["teams.id"], name="fk_sandboxes_team_id_teams", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_sandboxes_team_id_state_started_at", "sandboxes", ["team_id", "state", "started_at"])
    op.create_index("ix_sandboxes_state_end_at", "sandboxes", ["state", "end_at"])


def downgrade() -> None:
    op.drop_index("ix_sandboxes_state_end_at", table_name="sandboxes")
    op.drop_index("ix_sandboxes_team_id_state_started_at", table_name="sandboxes")
    op.drop_table("sandboxes")
    op.drop_index("ix_api_keys_team_id", table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("teams")
